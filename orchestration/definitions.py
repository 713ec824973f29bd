"""The Dagster definitions: `dagster dev -m orchestration.definitions`."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job

from orchestration.assets import build_assets
from orchestration.resources import TokenlineResource, default_profile

_resource = TokenlineResource(profile=default_profile())
# Partitions are the datasets the chosen profile makes active.
DATASETS = _resource.params().active_datasets
ASSETS = build_assets(DATASETS)

lineage_job = define_asset_job("lineage", selection=AssetSelection.all(), description="Materialize the whole lineage for one dataset.")

defs = Definitions(
    assets=ASSETS,
    jobs=[lineage_job],
    resources={"tokenline": _resource},
)
