"""The `tokenline` command: run stages, list them, print dvc.yaml."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from tokenline.config import ConfigError, load_params, project_root

app = typer.Typer(add_completion=False, no_args_is_help=True, help="tokenline: compact-token text-to-image pipeline.")


@app.command()
def stages() -> None:
    """List the registered stages with their inputs and outputs."""
    from tokenline.pipeline import STAGES

    for stage in STAGES:
        inputs = ", ".join(stage.inputs) or "-"
        outputs = ", ".join(stage.outputs)
        scope = "" if stage.per_dataset else " (once, over every active dataset)"
        typer.echo(f"{stage.name:<10} [{stage.area}] {inputs} -> {outputs}{scope}")
        typer.echo(f"{'':<10} {stage.description}")


@app.command("dvc-yaml")
def dvc_yaml() -> None:
    """Print dvc.yaml as generated from the stage registry."""
    from tokenline.dvc_yaml import render_dvc_yaml

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
) -> None:
    """Run STAGE (after any stale upstream stage) on every active dataset, or on --dataset.

    A stage that covers every dataset (`report`) runs once, after the others.
    """
    from tokenline.pipeline import STAGES, get_stage
    from tokenline.runner import MissingInputError, run_project, run_with_upstream
    from tokenline.generator.checkpoint import PairingError
    from tokenline.model_checkpoint import CheckpointError
    from tokenline.tokenizer.token_cache import StaleTokenCacheError
    from tokenline.training import ResumeRefusedError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        params = load_params(params_file, profile=profile, overrides=set_, dataset=dataset)
        targets = STAGES if stage == "all" else [get_stage(stage)]
    except (ConfigError, KeyError) as error:
        typer.secho(f"error: {error.args[0] if error.args else error}", fg="red", err=True)
        raise typer.Exit(2)
    root = params_file.parent if params_file else project_root()
    summary: list[str] = []
    seen: set[tuple[str | None, str]] = set()

    def record(outcomes) -> None:
        for outcome in outcomes:
            if (outcome.dataset, outcome.stage) in seen:
                continue
            seen.add((outcome.dataset, outcome.stage))
            state = "fresh" if outcome.skipped else "ran"
            counts = next(iter(outcome.manifests.values()), {}).get("counts", {})
            summary.append(f"{outcome.dataset or '(all)':<10} {outcome.stage:<10} {state:<6} {counts}")

    try:
        # Per-dataset stages first, dataset by dataset; then the stages that cover every dataset.
        for name in params.active_datasets:
            for target in (t for t in targets if t.per_dataset):
                record(run_with_upstream(target, params, name, root, upstream=upstream, force=force, resume=resume))
        for target in (t for t in targets if not t.per_dataset):
            record(run_project(target, params, root, upstream=upstream, force=force))
    except (MissingInputError, FileNotFoundError, ResumeRefusedError, CheckpointError, StaleTokenCacheError, PairingError) as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo("\n".join(summary))
    typer.echo(f"outputs: {root / 'data'}   reports: {root / 'data' / 'reports'}")
    if params.tracking.enabled:
        from tokenline.tracking import tracking_uri

        typer.echo(f"MLflow runs: {tracking_uri(params, root)} (browse: mlflow ui --backend-store-uri {tracking_uri(params, root)})")


def main() -> None:
    """Entry point of the `tokenline` console script."""
    app()


if __name__ == "__main__":
    main()
