"""The nightly re-evaluation job: each active dataset's `production` model against today's eval data (tokenline.export.nightly)."""

from pathlib import Path

from dagster import Config, Failure, OpExecutionContext, job, op

from tokenline.export.nightly import evaluate_production, nightly_line
from tokenline.threads import use_usable_cores
from tokenline.tracking import tracking_uri


class NightlyConfig(Config):
    """Which night to write: the schedule passes its tick's date; a manual launch defaults to today."""

    day: str | None = None  # YYYY-MM-DD


@op(required_resource_keys={"tokenline"})
def reevaluate_production(context: OpExecutionContext, config: NightlyConfig) -> None:
    """Write data/reports/nightly/<day>/<dataset>.json for every active dataset; fail the run on a regression
    (after every report is written), so the run list and the failure sensor show it."""
    resource = context.resources.tokenline
    root = Path(resource.root)
    use_usable_cores()
    problems = []
    for dataset in resource.params().active_datasets:
        params = resource.params(dataset)
        try:
            report = evaluate_production(dataset, params, root, tracking_uri(params, root), config.day)
        except Exception as error:  # noqa: BLE001 - one dataset's missing model must not hide the others' reports
            problems.append(f"{dataset}: {' '.join(str(error).split())}")
            context.log.error(problems[-1])
            continue
        context.log.info(nightly_line(report))
        if report["regressed"]:
            problems.append(nightly_line(report))
    if problems:
        raise Failure(description="; ".join(problems))


@job(description="Re-evaluate each dataset's production model (fixed seed) and write a dated report; "
                 "fails when a figure regressed beyond nightly.max_regression against the previous night.")
def nightly_eval():
    """The nightly re-evaluation of production."""
    reevaluate_production()
