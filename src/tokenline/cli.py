"""The `tokenline` command: run stages, list them, print dvc.yaml, generate images from an export."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from tokenline.config import ConfigError
from tokenline.params_loading import load_params, project_root
from tokenline.dvc_yaml import render_dvc_yaml
from tokenline.export.generation import open_pipeline, resolve_model, write_images
from tokenline.export.nightly import DAY_PATTERN, evaluate_production, nightly_line
from tokenline.export.registry import STUDENT_SUFFIX, model_name
from tokenline.export.registry import promote as promote_version
from tokenline.pipeline import STAGES, get_stage
from tokenline.runner import check_params, run_project, run_with_upstream
from tokenline.threads import use_usable_cores
from tokenline.tracking import tracking_uri

app = typer.Typer(add_completion=False, no_args_is_help=True, help="tokenline: compact-token text-to-image pipeline.")


@app.command()
def stages() -> None:
    """List the registered stages with their inputs and outputs."""
    for stage in STAGES:
        inputs = ", ".join(stage.inputs) or "-"
        outputs = ", ".join(stage.outputs)
        scope = "" if stage.per_dataset else " (once, over every active dataset)"
        typer.echo(f"{stage.name:<10} [{stage.area}] {inputs} -> {outputs}{scope}")
        typer.echo(f"{'':<10} {stage.description}")


@app.command("dvc-yaml")
def dvc_yaml() -> None:
    """Print dvc.yaml as generated from the stage registry."""
    sys.stdout.write(render_dvc_yaml())


@app.command()
def run(
    stage: str = typer.Argument(..., help="stage name, or `all`"),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="params profile (default: params.yaml's `profile`)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a param: key=value (repeatable)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="run on this dataset only"),
    upstream: bool = typer.Option(True, "--upstream/--no-upstream", help="first run upstream stages that are missing or stale"),
    force: bool = typer.Option(False, "--force", help="run the named stage even when its outputs are fresh; with --resume, resume despite a changed training config"),
    resume: bool = typer.Option(False, "--resume", help="training stages: continue from the last state folder (optimizer, scheduler, EMA, RNG, data position)"),
    params_file: Optional[Path] = typer.Option(None, "--params", help="params file (default: ./params.yaml)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="on failure, print the full traceback (also: TOKENLINE_DEBUG=1)"),
) -> None:
    """Run STAGE (after any stale upstream stage) on every active dataset, or on --dataset.

    A stage that covers every dataset (`report`) runs once, after the others. A failure prints
    one line naming the file or setting at fault and exits 1 (2 for bad params).
    """

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "alembic", "mlflow", "dvc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    use_usable_cores()
    try:
        params = load_params(params_file, profile=profile, overrides=set_, dataset=dataset)
        check_params(params)
        targets = STAGES if stage == "all" else [get_stage(stage)]
    except (ConfigError, KeyError) as error:
        typer.secho(f"error: {error.args[0] if error.args else error}", fg="red", err=True)
        raise typer.Exit(2)
    root = params_file.parent if params_file else project_root()
    summary = RunSummary()
    record = summary.add

    try:
        # Per-dataset stages first, dataset by dataset; then the stages that cover every dataset.
        for name in params.active_datasets:
            for target in (t for t in targets if t.per_dataset):
                record(run_with_upstream(target, params, name, root, upstream=upstream, force=force, resume=resume))
        for target in (t for t in targets if not t.per_dataset):
            record(run_project(target, params, root, upstream=upstream, force=force))
    except KeyboardInterrupt:
        typer.secho("interrupted: committed outputs are as they were; `--resume` continues a training stage", err=True)
        raise typer.Exit(130)
    except Exception as error:  # noqa: BLE001 - every failure becomes one line a person can act on
        if verbose or os.environ.get("TOKENLINE_DEBUG") == "1":
            raise
        typer.secho(f"error: {one_line(error)}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo("\n".join(summary.lines))
    typer.echo(f"outputs: {root / 'data'}   reports: {root / 'data' / 'reports'}")
    report = root / "data" / "reports" / "report.html"
    if report.is_file():
        typer.echo(f"report: {report}")
    if params.tracking.enabled:
        typer.echo(f"MLflow runs: {tracking_uri(params, root)} (browse: mlflow ui --backend-store-uri {tracking_uri(params, root)})")


@app.command()
def generate(
    model: str = typer.Option(..., "--model", "-m", help="an exported folder (models/openmoji/onnx) or an MLflow URI (models:/tokenline-openmoji@production, runs:/<run>/pipeline)"),
    prompt: list[str] = typer.Option(..., "--prompt", help="a prompt (repeatable); \"\" samples unconditionally"),
    n: int = typer.Option(1, "--n", min=1, help="images per prompt"),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="folder for the PNG files and sheet.png"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="sampling steps / decoding rounds (default: the export's)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", min=0.0, help="classifier-free guidance scale (default: the export's)"),
    seed: int = typer.Option(0, "--seed", help="image i draws its noise from (seed, i)"),
    runtime: str = typer.Option("onnx", "--runtime", help="onnx (onnxruntime) or torch (the source checkpoints)"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="images per onnxruntime call"),
) -> None:
    """Generate images for prompts with an exported pipeline; prints where it wrote them."""
    use_usable_cores()
    try:
        pipeline = open_pipeline(resolve_model(model, _tracking_uri_here()), runtime)
        prompts = [text for text in prompt for _ in range(n)]
        paths, sheet = write_images(pipeline, prompts, out, batch_size, steps=steps, guidance=guidance, seed=seed)
    except Exception as error:  # noqa: BLE001 - one line a person can act on
        if os.environ.get("TOKENLINE_DEBUG") == "1":
            raise
        typer.secho(f"error: {one_line(error)}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"wrote {len(paths)} image{'s' if len(paths) != 1 else ''} to {out}/" + (f" (contact sheet: {sheet})" if sheet else ""))


@app.command()
def promote(
    dataset: str = typer.Argument(..., help="the dataset whose model tokenline-<dataset> to promote"),
    version: Optional[int] = typer.Option(None, "--version", help="the version to promote (default: @candidate)"),
    force: bool = typer.Option(False, "--force", help="promote a version whose gates failed"),
    student: bool = typer.Option(False, "--student", help="promote the distilled student, tokenline-<dataset>-student"),
    params_file: Optional[Path] = typer.Option(None, "--params", help="params file (default: ./params.yaml)"),
) -> None:
    """Point tokenline-<dataset>@production (or -student@production) at a registered version (its gates must have passed)."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        params = load_params(params_file)
        root = params_file.parent if params_file else project_root()
        suffix = STUDENT_SUFFIX if student else ""
        promoted = promote_version(dataset, tracking_uri(params, root), version, force, suffix)
    except Exception as error:  # noqa: BLE001 - one line a person can act on
        typer.secho(f"error: {one_line(error)}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"models:/{model_name(dataset, suffix)}@production -> version {promoted}")


@app.command()
def nightly(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="this dataset only (default: every active one)"),
    day: Optional[str] = typer.Option(None, "--day", help="the report's date, YYYY-MM-DD (default: today)"),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="params profile (default: params.yaml's `profile`)"),
    params_file: Optional[Path] = typer.Option(None, "--params", help="params file (default: ./params.yaml)"),
) -> None:
    """Re-evaluate each dataset's production model on today's eval data; exit 1 on a regression.

    Writes data/reports/nightly/<day>/<dataset>.json (kept: a second run for the same day prints the
    first report) and compares it with the newest earlier night's.
    """
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    use_usable_cores()
    if day is not None and not DAY_PATTERN.match(day):
        typer.secho(f"error: --day must be YYYY-MM-DD, not {day!r}", fg="red", err=True)
        raise typer.Exit(2)
    failed = False
    try:
        params = load_params(params_file, profile=profile, dataset=dataset)
    except ConfigError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2)
    root = params_file.parent if params_file else project_root()
    for name in params.active_datasets:
        try:
            report = evaluate_production(name, params, root, tracking_uri(params, root), day, progress=True)
        except Exception as error:  # noqa: BLE001 - one line a person can act on, then the next dataset
            typer.secho(f"error: {name}: {one_line(error)}", fg="red", err=True)
            failed = True
            continue
        typer.echo(nightly_line(report))
        failed |= report["regressed"]
    raise typer.Exit(1 if failed else 0)


def _tracking_uri_here() -> str | None:
    """The MLflow store `models:/` URIs resolve against: MLFLOW_TRACKING_URI, else this project's params."""
    try:
        return tracking_uri(load_params(None), project_root())
    except (ConfigError, OSError):
        return os.environ.get("MLFLOW_TRACKING_URI")


class RunSummary:
    """The table `run` prints at the end: one line per dataset and stage, `ran` or `fresh`, with its counts."""

    def __init__(self):
        self.lines: list[str] = []
        self._seen: set[tuple[str | None, str]] = set()

    def add(self, outcomes) -> None:
        """Record each stage outcome once (an upstream stage comes back from every target that needs it)."""
        for outcome in outcomes:
            if (outcome.dataset, outcome.stage) in self._seen:
                continue
            self._seen.add((outcome.dataset, outcome.stage))
            state = "fresh" if outcome.skipped else "ran"
            counts = next(iter(outcome.manifests.values()), {}).get("counts", {})
            self.lines.append(f"{outcome.dataset or '(all)':<10} {outcome.stage:<17} {state:<6} {counts}")


def one_line(error: BaseException) -> str:
    """An error as one line, no traceback: tokenline's own errors by their message (it names the file or
    setting and the fix), others with their type in front."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None:
        # "[Errno 28] No space left on device: 'models/x/...'" names the file already.
        return f"{type(error).__name__}: {message}"
    if type(error).__module__ == "tokenline" or type(error).__module__.startswith("tokenline."):
        return message
    return f"{type(error).__name__}: {message}"


def main() -> None:
    """Entry point of the `tokenline` console script."""
    app()


if __name__ == "__main__":
    main()
