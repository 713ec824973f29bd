"""The jobs: the per-dataset lineage, and the report over every dataset.

A job's assets share one partitioning, so the project-scope report is a job of its own (and a
job may not share its name with an asset's op: hence report_all).
"""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job

from orchestration.defs.assets import project_asset_keys

PROJECT = AssetSelection.assets(*project_asset_keys())

lineage_job = define_asset_job("lineage", selection=AssetSelection.all() - PROJECT,
                               description="Materialize the whole lineage for one dataset.")
report_job = define_asset_job("report_all", selection=PROJECT,
                              description="Rebuild the HTML report over every dataset's latest eval.")

JOBS = [lineage_job, report_job]
