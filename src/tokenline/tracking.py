"""MLflow: every stage run becomes a run with its params, step metrics, counts and artifacts."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from tokenline.config import Params

log = logging.getLogger(__name__)


def tracking_uri(params: Params, root: Path) -> str:
    """MLFLOW_TRACKING_URI if set, else params' tracking.uri, else a SQLite file in the project."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or params.tracking.uri
        or f"sqlite:///{(Path(root) / 'mlruns.db').resolve()}"
    )


def _flatten(prefix: str, value: Any, into: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, child in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), child, into)
    else:
        # MLflow caps param values; long values (templates, URLs) are cut, not refused.
        into[prefix] = str(value)[:6000]


def _experiment_id(client, params: Params, uri: str) -> str:
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    # A SQLite store has no artifact root of its own: keep artifacts beside the database.
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(params.tracking.experiment, artifact_location=location)


def project_experiment(params: Params, root: Path) -> tuple[str, str]:
    """(tracking URI, experiment id) of the project's MLflow experiment, created when missing."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params, root)
    return uri, _experiment_id(MlflowClient(tracking_uri=uri), params, uri)


def run_link(params: Params, root: Path, run_id: str) -> str:
    """A link to an MLflow run: the UI page on an HTTP tracking server, else a runs:/ URI."""
    uri = tracking_uri(params, root)
    if uri.startswith(("http://", "https://")):
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    return f"runs:/{run_id}"


def fail_orphaned_runs(client, experiment: str, tags: dict[str, str]) -> list[str]:
    """Mark FAILED the RUNNING runs of this stage, dataset, project and host: their process died.

    Called while the runner holds the stage's output locks, so no live process of this project
    can own such a run (a run that ended in any other way finished or failed itself).
    """
    query = " and ".join(f"tags.{key} = '{tags[key]}'" for key in ("stage", "dataset", "host"))
    orphans = []
    for run in client.search_runs([experiment], f"{query} and attributes.status = 'RUNNING'"):
        if run.data.tags.get("root") == tags["root"]:
            client.set_terminated(run.info.run_id, "FAILED")
            orphans.append(run.info.run_id)
    if orphans:
        log.warning("marked %d MLflow run(s) of %s on %s FAILED: their process died", len(orphans), tags["stage"], tags["dataset"])
    return orphans


class StageTracker:
    """The MLflow run of one stage run: step metrics and images while it runs, the rest when it ends."""

    def __init__(self, stage, params: Params, dataset: str | None, root: Path):
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(params, root)
        self.client = MlflowClient(tracking_uri=uri)
        self.stage, self.params, self.dataset = stage, params, dataset
        flat: dict[str, str] = {}
        _flatten("", {key: params.section(key) for key in stage.params}, flat)
        if dataset is None:  # a project-scope stage: every active dataset
            _flatten("datasets", {name: params.dataset(name).model_dump(mode="json") for name in params.active_datasets}, flat)
        else:
            _flatten("dataset", params.dataset(dataset).model_dump(mode="json"), flat)
        flat["profile"] = params.profile
        scope = dataset or ",".join(params.active_datasets)
        # host and root say which runs a later run of this stage may declare dead (fail_orphaned_runs).
        tags = {"stage": stage.name, "dataset": scope, "profile": params.profile, "area": stage.area,
                "root": str(Path(root).resolve()), "host": socket.gethostname(), "pid": str(os.getpid())}
        run_name = stage.name if dataset is None else f"{stage.name}:{dataset}"
        experiment = _experiment_id(self.client, params, uri)
        fail_orphaned_runs(self.client, experiment, tags)
        run = self.client.create_run(experiment, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in flat.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Log numbers at a training step (live: visible in the MLflow UI while the stage runs)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items() if math.isfinite(float(value))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_image(self, image, artifact_file: str) -> None:
        """Log a PIL image (a reconstruction grid, a contact sheet) as an artifact."""
        self.client.log_image(self.run_id, image, artifact_file)

    def finish(self, result, manifests: dict, files: list[tuple[Path, str]]) -> str:
        """Log counts, final metrics, manifests, report and (file, artifact folder) files; mark the run finished."""
        numbers = {
            key: float(value)
            for key, value in {**result.counts, **result.metrics}.items()
            if isinstance(value, (int, float))
        }
        self.log_metrics(0, numbers)
        with tempfile.TemporaryDirectory() as scratch:
            for name, manifest in manifests.items():
                path = Path(scratch) / f"{name}.manifest.json"
                path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
                self.client.log_artifact(self.run_id, str(path), artifact_path="manifests")
        if result.report is not None:
            self.client.log_dict(self.run_id, result.report, f"reports/{self.stage.name}.json")
        for file, folder in files:
            self.client.log_artifact(self.run_id, str(file), artifact_path=folder)
        self.client.set_terminated(self.run_id, "FINISHED")
        return self.run_id

    def fail(self) -> None:
        """Mark the run failed (the stage raised); a tracking store that fails too must not hide the stage's error."""
        try:
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception as error:  # noqa: BLE001 - the stage's own error is the one to report
            log.warning("could not mark MLflow run %s failed: %s", self.run_id, error)


class NullTracker:
    """Stands in for StageTracker when tracking is off: every call does nothing."""

    run_id = None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Do nothing."""

    def log_image(self, image, artifact_file: str) -> None:
        """Do nothing."""

    def finish(self, result, manifests: dict, files: list[tuple[Path, str]]) -> None:
        """Do nothing."""

    def fail(self) -> None:
        """Do nothing."""


def start_tracker(stage, params: Params, dataset: str | None, root: Path) -> StageTracker | NullTracker:
    """A live MLflow run for the stage run, or a no-op tracker when tracking.enabled is false."""
    if not params.tracking.enabled:
        return NullTracker()
    return StageTracker(stage, params, dataset, root)
