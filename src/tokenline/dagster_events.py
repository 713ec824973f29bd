"""What Dagster shows of a built output (its materialization metadata), and runless reports of stages built outside Dagster.

A stage built by `tokenline run` or `dvc repro` is reported to the project's Dagster home as a
runless materialization (with its asset checks), so the Dagster UI shows the lineage as built
whichever driver built it. Dagster's own materializations carry the same metadata.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image

from tokenline.config import Params
from tokenline.contact_sheet import markdown_image
from tokenline.dvc_lock import DVC_RUNNING
from tokenline.layout import html_relpath, output_path, report_path, samples_path
from tokenline.stage import Stage
from tokenline.tracking import run_link

log = logging.getLogger(__name__)

# The project's Dagster home (gitignored): `make dagster` starts the UI on it; DAGSTER_HOME wins when set.
DAGSTER_HOME = ".dagster_home"


def dagster_home(root: Path) -> Path:
    """The Dagster instance folder the project's runs are reported to: $DAGSTER_HOME, else `<root>/.dagster_home`."""
    return Path(os.environ.get("DAGSTER_HOME") or Path(root) / DAGSTER_HOME)


def materialization_metadata(stage: Stage, output: str, manifest: dict, root: Path, dataset: str | None,
                             params: Params, mlflow_run_id: str | None = None) -> dict[str, Any]:
    """The metadata of one materialized output: path, hashes, counts, metrics, report, samples, MLflow run."""
    from dagster import MetadataValue

    root = Path(root)
    metadata: dict[str, Any] = {
        "path": MetadataValue.path(str(output_path(root, dataset, output))),
        "content_hash": manifest["content_hash"],
        "params_hash": manifest["params_hash"],
        "wall_time_s": manifest["wall_time_s"],
        "git_commit": manifest.get("git_commit") or "unknown",
        **{f"count_{key}": int(value) for key, value in manifest["counts"].items()},
        **{key: float(value) for key, value in manifest["metrics"].items()},
    }
    if dataset is None:
        metadata["datasets"] = ", ".join(sorted({key.split("/")[0] for key in manifest["inputs"]}))
        if stage.html:
            html = root / html_relpath(None, stage.name)
            metadata["html_report"] = MetadataValue.path(str(html))
            metadata["open_report"] = MetadataValue.url(html.resolve().as_uri())
    else:
        if stage.report and report_path(root, dataset, stage.name).exists():
            metadata["report"] = MetadataValue.json(json.loads(report_path(root, dataset, stage.name).read_text()))
        sheet = samples_path(root, dataset, stage.name)
        if sheet.exists():
            with Image.open(sheet) as image:
                metadata["samples"] = MetadataValue.md(markdown_image(image.convert("RGB"), f"{stage.name} samples"))
    if mlflow_run_id:
        metadata["mlflow_run"] = MetadataValue.url(run_link(params, root, mlflow_run_id))
    return metadata


def report_runless(stage: Stage, params: Params, dataset: str | None, root: Path, manifests: dict[str, dict],
                   mlflow_run_id: str | None = None) -> bool:
    """Report a stage built outside Dagster to the project's Dagster home: a materialization per output
    (partition = dataset) and its asset checks' results. True when reported; a failure only logs."""
    from dagster import AssetCheckEvaluation, AssetKey, AssetMaterialization, DagsterInstance

    home = dagster_home(root)
    try:
        home.mkdir(parents=True, exist_ok=True)
        with DagsterInstance.from_config(str(home)) as instance:
            for output, manifest in manifests.items():
                metadata = materialization_metadata(stage, output, manifest, root, dataset, params, mlflow_run_id)
                instance.report_runless_asset_event(
                    AssetMaterialization(asset_key=AssetKey([output]), partition=dataset, metadata=metadata,
                                         description=f"built by {driver_name()}"))
            for check in stage.checks:
                passed, metadata = check.func(root, manifests[check.output], params)
                instance.report_runless_asset_event(
                    AssetCheckEvaluation(asset_key=AssetKey([check.output]), check_name=check.name, passed=passed,
                                         metadata=metadata, partition=dataset))
    except Exception as error:  # noqa: BLE001 - the outputs are built; the UI's record of them is secondary
        log.warning("Dagster home %s not updated for %s: %s", home, stage.name, error)
        return False
    return True


def driver_name() -> str:
    """Which driver ran the stage, as the UI names it: `dvc repro` or `tokenline run`."""
    return "dvc repro" if os.environ.get(DVC_RUNNING) else "tokenline run"
