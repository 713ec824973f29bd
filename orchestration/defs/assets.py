"""One Dagster multi-asset per registry stage: an asset per output, partitioned by dataset (project stages: not)."""

from __future__ import annotations

from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetKey,
    AssetSpec,
    AssetsDefinition,
    MaterializeResult,
    StaticPartitionsDefinition,
    multi_asset,
)

from tokenline.dagster_events import materialization_metadata
from tokenline.layout import output_relpath
from tokenline.pipeline import STAGES
from tokenline.stage import Stage
from tokenline.runner import run_project, run_with_upstream
from tokenline.threads import use_usable_cores


def asset_key(output: str) -> AssetKey:
    """The asset key of a registry output."""
    return AssetKey([output])


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
            (outcome,) = run_project(stage, params, root, upstream=False, force=True, tell_dagster=False)
            for output, manifest in outcome.manifests.items():
                yield MaterializeResult(asset_key=asset_key(output), metadata=materialization_metadata(
                    stage, output, manifest, root, None, params, outcome.mlflow_run_id))
            return
        dataset = context.partition_key
        params = resource.params(dataset)
        # Dagster orders the assets itself, so only this stage runs here.
        (outcome,) = run_with_upstream(stage, params, dataset, root, upstream=False, force=True, tell_dagster=False)
        for output, manifest in outcome.manifests.items():
            yield MaterializeResult(asset_key=asset_key(output), metadata=materialization_metadata(
                stage, output, manifest, root, dataset, params, outcome.mlflow_run_id))
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
