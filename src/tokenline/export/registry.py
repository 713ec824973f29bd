"""The MLflow model registry: each export becomes a version of `tokenline-<dataset>`, aliased
`candidate`; `production` moves to it only when its eval figures pass `registry.gates`.

Aliases, not stages (MLflow deprecated stages): a downstream team loads
`models:/tokenline-<dataset>@production` and gets the last version that passed. A version that
fails keeps `candidate` and a `gate_failures` tag saying why; production stays where it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from tokenline.eval.gates import check_gates, scalar_figures
from tokenline.export.runtime import MODEL_ARTIFACT, read_pipeline

# The models-from-code file MLflow stores with each registered version (run on load; see its docstring).
MODEL_FILE = Path(__file__).with_name("mlflow_model.py")
CANDIDATE, PRODUCTION = "candidate", "production"


STUDENT_SUFFIX = "-student"  # tokenline-<dataset>-student: the dataset's distilled student


def model_name(dataset: str, suffix: str = "") -> str:
    """The registered model of a dataset (`suffix` "-student": its distilled student's)."""
    return f"tokenline-{dataset}{suffix}"


def gate_figures(gen_eval_report: dict[str, Any], pipeline: dict[str, Any]) -> dict[str, float]:
    """The numbers gates read: gen_eval's scalar figures and the export's parity."""
    figures = scalar_figures(gen_eval_report)
    figures["parity_max_abs_diff"] = float(pipeline.get("parity", {}).get("max_abs_diff", float("inf")))
    return figures


def signature_and_example(pipeline: dict[str, Any]):
    """The pyfunc's signature: one unnamed string column of prompts (so a plain list of prompts is valid input,
    as is a DataFrame with one `prompt` column); params steps, guidance, seed with the export's defaults."""
    from mlflow.models import infer_signature

    example = ["a red heart"]
    output = pd.DataFrame({"prompt": ["a red heart"], "png_base64": ["iVBORw0KGgo="]})
    g = pipeline["generator"]
    params = {"steps": int(g["steps"]), "guidance": float(g["guidance"]), "seed": 0}
    return infer_signature(example, output, params=params), example


def register(folder: Path, name: str, dataset: str, tags: dict[str, str], figures: dict[str, float], gates: list[str],
             tracking_uri: str, experiment_id: str) -> dict[str, Any]:
    """Log `folder` as a pyfunc model, register it as a new version of `name`, alias it, and gate production."""
    import mlflow
    from mlflow import MlflowClient

    pipeline = read_pipeline(folder)
    signature, example = signature_and_example(pipeline)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"registry {name}",
                          tags={"tokenline.stage": "registry", "tokenline.dataset": dataset}) as run:
        info = mlflow.pyfunc.log_model(
            name="pipeline", python_model=str(MODEL_FILE), artifacts={MODEL_ARTIFACT: str(folder)},
            signature=signature, input_example=example, registered_model_name=name,
            pip_requirements=["numpy", "pandas", "pillow", "onnxruntime", "tokenizers", "mlflow"],
        )
        mlflow.log_metrics({key: value for key, value in figures.items() if value == value and abs(value) != float("inf")})
    version = str(info.registered_model_version)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    failures, skipped = check_gates(gates, figures)
    for key, value in {**tags, "gates": json.dumps(gates), "gates_passed": str(not failures).lower(),
                       "gate_failures": "; ".join(failures) or "none", "gates_skipped": "; ".join(skipped) or "none"}.items():
        client.set_model_version_tag(name, version, key, str(value)[:5000])
    client.set_registered_model_alias(name, CANDIDATE, version)
    if not failures:
        client.set_registered_model_alias(name, PRODUCTION, version)
    production = _alias_version(client, name, PRODUCTION)
    return {"model": name, "version": int(version), "run_id": run.info.run_id, "gates_passed": not failures,
            "gate_failures": failures, "gates_skipped": skipped, "production_version": production,
            "model_uri": f"models:/{name}@{PRODUCTION}" if production else None}


def _alias_version(client, name: str, alias: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote(dataset: str, tracking_uri: str, version: int | None = None, force: bool = False, suffix: str = "") -> int:
    """Point `production` at `version` (default: the `candidate`), refusing a version whose gates failed unless forced."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name = model_name(dataset, suffix)
    try:
        chosen = client.get_model_version(name, str(version)) if version else client.get_model_version_by_alias(name, CANDIDATE)
    except MlflowException as err:
        known = ", ".join(m.name for m in client.search_registered_models()) or "none"
        raise ValueError(f"no version {version or '@' + CANDIDATE} of {name} (registered models: {known})") from err
    if chosen.tags.get("gates_passed") != "true" and not force:
        raise ValueError(f"{name} version {chosen.version} failed its gates ({chosen.tags.get('gate_failures', 'unknown')}); "
                         "--force promotes it anyway")
    client.set_registered_model_alias(name, PRODUCTION, chosen.version)
    return int(chosen.version)
