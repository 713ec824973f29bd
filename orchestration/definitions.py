"""The Dagster definitions: `dagster dev -m orchestration.definitions`."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, ScheduleDefinition, define_asset_job

from orchestration.assets import build_assets, project_asset_keys
from orchestration.resources import TokenlineResource, default_profile

_resource = TokenlineResource(profile=default_profile())
# Partitions are the datasets the chosen profile makes active.
DATASETS = _resource.params().active_datasets
ASSETS = build_assets(DATASETS)

# A job's assets share one partitioning: the per-dataset lineage, and the report over every dataset.
# (A job may not share its name with an asset's op: hence report_all.)
PROJECT = AssetSelection.assets(*project_asset_keys())
lineage_job = define_asset_job("lineage", selection=AssetSelection.all() - PROJECT,
                               description="Materialize the whole lineage for one dataset.")
report_job = define_asset_job("report_all", selection=PROJECT,
                              description="Rebuild the HTML report over every dataset's latest eval.")
nightly_report = ScheduleDefinition(name="nightly_report", job=report_job, cron_schedule="0 3 * * *",
                                    description="Every night at 03:00: the report from the latest evals.")

defs = Definitions(
    assets=ASSETS,
    jobs=[lineage_job, report_job],
    schedules=[nightly_report],
    resources={"tokenline": _resource},
)
