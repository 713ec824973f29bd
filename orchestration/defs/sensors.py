"""The sensors: a new generator or student checkpoint is shipped (evaluated, exported, registered); a failed run
logs its failed stages and marks them in data/reports/failures.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dagster import RunFailureSensorContext, RunRequest, SensorEvaluationContext, SensorResult, SkipReason, \
    run_failure_sensor, sensor

from orchestration.defs.jobs import SHIP_JOBS, SHIP_STAGES
from orchestration.defs.resources import TokenlineResource
from tokenline.artifacts import DamagedOutputError, read_manifest
from tokenline.config import Params
from tokenline.layout import output_path
from tokenline.locks import is_locked
from tokenline.pipeline import PRODUCER, get_stage
from tokenline.runner import MissingInputError, staleness

FAILURES = Path("data") / "reports" / "failures.jsonl"


def failure_record(context: RunFailureSensorContext) -> dict:
    """What failed: the run, its job and partition, each failed stage (the step of a stage's multi-asset) and its error."""
    run = context.dagster_run
    stages = {}
    for event in context.get_step_failure_events():
        error = event.step_failure_data.error if event.step_failure_data else None
        while error is not None and error.cause is not None:  # Dagster wraps the stage's own error
            error = error.cause
        stages[event.step_key] = error.message.strip().splitlines()[0] if error and error.message else "failed"
    return {
        "run_id": run.run_id,
        "job": run.job_name,
        "partition": run.tags.get("dagster/partition"),
        "stages": stages,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@run_failure_sensor(name="stage_failures", description="Log each failed run's stages and mark them in "
                    "data/reports/failures.jsonl (stage, partition, the error's last line).")
def stage_failure_sensor(context: RunFailureSensorContext, tokenline: TokenlineResource) -> None:
    """Record a failed run: one JSON line per run, appended, with every failed stage's error."""
    record = failure_record(context)
    for stage, error in record["stages"].items():
        context.log.error(f"stage {stage} failed on {record['partition'] or 'every dataset'} "
                          f"(run {record['run_id']}): {error}")
    path = Path(tokenline.root) / FAILURES
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as file:  # one short line per failure: appends do not interleave
        file.write(json.dumps(record, sort_keys=True) + "\n")


# The checkpoints whose arrival ships a model: the export's inputs made by a generator or a distilled student.
CHECKPOINT_AREAS = ("generator", "distill")


def watched_checkpoints(job: str = "ship") -> list[str]:
    """The outputs whose arrival starts `job` (`ship`: the generator; `ship_student`: the student)."""
    export = next(get_stage(name) for name in SHIP_STAGES[job] if get_stage(name).area == "export")
    return [name for name in export.inputs if PRODUCER[name].area in CHECKPOINT_AREAS and name in PRODUCER[name].models]


def ship_request(params: Params, dataset: str, root: Path, job: str = "ship") -> RunRequest | str:
    """A `job` run for `dataset` when a committed checkpoint is not yet evaluated, exported and registered;
    otherwise why not (a sentence). The run key names the job and the checkpoints' hashes: each lands once."""
    hashes = []
    for name in watched_checkpoints(job):
        manifest = read_manifest(output_path(root, dataset, name))
        if manifest is None:
            return f"{dataset}: no {name} checkpoint yet"
        hashes.append(manifest["content_hash"][:12])
    stages = [get_stage(name) for name in SHIP_STAGES[job]]
    busy = [output for stage in stages for output in stage.outputs if is_locked(output_path(root, dataset, output))]
    if busy:
        return f"{dataset}: a run is writing {', '.join(busy)}"
    try:
        stale = [stage.name for stage in stages if staleness(stage, params, dataset, root) is not None]
    except (DamagedOutputError, MissingInputError) as error:
        return f"{dataset}: {error}"
    if not stale:
        return f"{dataset}: checkpoint {'/'.join(hashes)} is already shipped"
    return RunRequest(run_key=f"{job}-{dataset}-{'-'.join(hashes)}", partition_key=dataset, job_name=job,
                      tags={"tokenline/reason": f"new checkpoint {'/'.join(hashes)}; stale: {', '.join(stale)}"})


@sensor(name="new_checkpoint", jobs=SHIP_JOBS, minimum_interval_seconds=60,
        description="When a new generator checkpoint lands, by any driver, run gen_eval, export and registry for its "
                    "dataset (job ship); when a new student lands, student_eval, student_export and student_registry "
                    "(job ship_student). Once per checkpoint.")
def new_checkpoint_sensor(context: SensorEvaluationContext, tokenline: TokenlineResource) -> SensorResult | SkipReason:
    """Ship each dataset's generator and student whose checkpoint is newer than its registered model."""
    root = Path(tokenline.root)
    requests, reasons = [], []
    for dataset in tokenline.params().active_datasets:
        for job in SHIP_STAGES:
            decision = ship_request(tokenline.params(dataset), dataset, root, job)
            (requests if isinstance(decision, RunRequest) else reasons).append(decision)
    if not requests:
        return SkipReason("; ".join(reasons))
    return SensorResult(run_requests=requests)


SENSORS = [new_checkpoint_sensor, stage_failure_sensor]
