"""One Dagster multi-asset per registry stage: an asset per output, partitioned by dataset (project stages: not)."""

from __future__ import annotations

import json
from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetKey,
    AssetSpec,
    AssetsDefinition,
    MaterializeResult,
    MetadataValue,
    StaticPartitionsDefinition,
    multi_asset,
)
from PIL import Image

from tokenline.contact_sheet import markdown_image
from tokenline.layout import html_relpath, output_path, output_relpath, report_path, samples_path
from tokenline.pipeline import STAGES
from tokenline.stage import Stage
from tokenline.runner import run_project, run_with_upstream
from tokenline.threads import use_usable_cores
from tokenline.tracking import run_link


def asset_key(output: str) -> AssetKey:
    """The asset key of a registry output."""
    return AssetKey([output])


def _output_metadata(stage: Stage, output: str, manifest: dict, root: Path, dataset: str) -> dict:
    metadata = {
        "path": MetadataValue.path(str(output_path(root, dataset, output))),
        "content_hash": manifest["content_hash"],
        "params_hash": manifest["params_hash"],
        "wall_time_s": manifest["wall_time_s"],
        "git_commit": manifest.get("git_commit") or "unknown",
        **{f"count_{key}": int(value) for key, value in manifest["counts"].items()},
        **{key: float(value) for key, value in manifest["metrics"].items()},
    }
    if stage.report and report_path(root, dataset, stage.name).exists():
        metadata["report"] = MetadataValue.json(json.loads(report_path(root, dataset, stage.name).read_text()))
    sheet = samples_path(root, dataset, stage.name)
    if sheet.exists():
        with Image.open(sheet) as image:
            metadata["samples"] = MetadataValue.md(markdown_image(image.convert("RGB"), f"{stage.name} samples"))
    return metadata


def _project_metadata(stage: Stage, output: str, manifest: dict, root: Path, outcome, params) -> dict:
    metadata = {
        "path": MetadataValue.path(str(output_path(root, None, output))),
        "content_hash": manifest["content_hash"],
        "wall_time_s": manifest["wall_time_s"],
        "git_commit": manifest.get("git_commit") or "unknown",
        "datasets": ", ".join(sorted({key.split("/")[0] for key in manifest["inputs"]})),
        **{f"count_{key}": int(value) for key, value in manifest["counts"].items()},
    }
    if stage.html:
        html = Path(root) / html_relpath(None, stage.name)
        metadata["html_report"] = MetadataValue.path(str(html))
        metadata["open_report"] = MetadataValue.url(html.resolve().as_uri())
    if outcome.mlflow_run_id:
        metadata["mlflow_run"] = MetadataValue.url(run_link(params, root, outcome.mlflow_run_id))
    return metadata


def build_stage_asset(stage: Stage, partitions: StaticPartitionsDefinition) -> AssetsDefinition:
    """The multi-asset that materializes every output of `stage`: per dataset partition, or once for the project."""
    partitioned = partitions if stage.per_dataset else None
    specs = [
        AssetSpec(
            key=asset_key(output),
            deps=[asset_key(name) for name in stage.inputs],
            description=f"{stage.description} ({output_relpath('<dataset>' if stage.per_dataset else None, output)})",
            group_name=stage.area,
            kinds={"tokenline"},
            partitions_def=partitioned,
        )
        for output in stage.outputs
    ]
    check_specs = [
        AssetCheckSpec(check.name, asset=asset_key(check.output), description=check.description,
                       blocking=check.blocking)
        for check in stage.checks
    ]

    @multi_asset(
        name=stage.name,
        specs=specs,
        check_specs=check_specs,
        partitions_def=partitioned,
        required_resource_keys={"tokenline"},
        description=stage.description,
    )
    def _materialize(context):  # no annotation: the string form confuses Dagster
        resource = context.resources.tokenline
        root = Path(resource.root)
        use_usable_cores()  # a run worker's torch threads: the cores it may use, not the machine's
        if not stage.per_dataset:
            # Reads every active dataset's upstream partitions, already materialized.
            params = resource.params()
            (outcome,) = run_project(stage, params, root, upstream=False, force=True)
            for output, manifest in outcome.manifests.items():
                yield MaterializeResult(asset_key=asset_key(output),
                                        metadata=_project_metadata(stage, output, manifest, root, outcome, params))
            return
        dataset = context.partition_key
        params = resource.params(dataset)
        # Dagster orders the assets itself, so only this stage runs here.
        (outcome,) = run_with_upstream(stage, params, dataset, root, upstream=False, force=True)
        for output, manifest in outcome.manifests.items():
            yield MaterializeResult(asset_key=asset_key(output), metadata=_output_metadata(stage, output, manifest, root, dataset))
        for check in stage.checks:
            passed, metadata = check.func(root, outcome.manifests[check.output], params)
            yield AssetCheckResult(asset_key=asset_key(check.output), check_name=check.name, passed=passed, metadata=metadata)

    return _materialize


def build_assets(datasets: list[str]) -> list[AssetsDefinition]:
    """Every registry stage as a multi-asset: per-dataset stages over the dataset partitions."""
    partitions = StaticPartitionsDefinition(datasets)
    return [build_stage_asset(stage, partitions) for stage in STAGES]


def project_asset_keys() -> list[AssetKey]:
    """The assets that cover every dataset at once (not partitioned)."""
    return [asset_key(output) for stage in STAGES if not stage.per_dataset for output in stage.outputs]
