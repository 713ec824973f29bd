"""MLflow helpers: every stage run becomes a run with its params, counts and artifacts."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tokenline.config import Params


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


def _experiment_id(mlflow, params: Params, root: Path) -> str:
    experiment = mlflow.get_experiment_by_name(params.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    # A SQLite store has no artifact root of its own: keep artifacts beside the database.
    location = None
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(params.tracking.experiment, artifact_location=location)


def log_stage_run(stage, params: Params, dataset: str, root: Path, result, manifests: dict, sheet_file: Path | None) -> str:
    """Log one stage run: params slice, counts and metrics, manifests, report and contact sheet."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params, root))
    experiment_id = _experiment_id(mlflow, params, root)
    flat: dict[str, str] = {}
    _flatten("", {key: params.section(key) for key in stage.params}, flat)
    _flatten("dataset", params.dataset(dataset).model_dump(mode="json"), flat)
    flat["profile"] = params.profile
    numbers = {
        key: float(value)
        for key, value in {**result.counts, **result.metrics}.items()
        if isinstance(value, (int, float))
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{stage.name}:{dataset}") as run:
        mlflow.set_tags({"stage": stage.name, "dataset": dataset, "profile": params.profile, "area": stage.area})
        mlflow.log_params(flat)
        if numbers:
            mlflow.log_metrics(numbers)
        with tempfile.TemporaryDirectory() as scratch:
            for name, manifest in manifests.items():
                path = Path(scratch) / f"{name}.manifest.json"
                path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
                mlflow.log_artifact(str(path), artifact_path="manifests")
        if result.report is not None:
            mlflow.log_dict(result.report, f"reports/{stage.name}.json")
        if sheet_file is not None:
            mlflow.log_artifact(str(sheet_file), artifact_path="samples")
        return run.info.run_id
