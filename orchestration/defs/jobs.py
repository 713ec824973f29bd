"""The jobs: the per-dataset lineage, shipping a new checkpoint, the report over every dataset, the nightly re-eval.

A job's assets share one partitioning, so the project-scope report is a job of its own (and a
job may not share its name with an asset's op: hence report_all).
"""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job

from orchestration.defs.assets import asset_key, project_asset_keys
from orchestration.defs.nightly import nightly_eval
from tokenline.pipeline import get_stage

# Shipping a checkpoint: its eval (whose blocking gates check stops a failing model), the export, the
# registration. One job per checkpoint, so a new generator ships before its student is distilled.
SHIP_STAGES = {"ship": ("gen_eval", "export", "registry"),
               "ship_student": ("student_eval", "student_export", "student_registry")}

PROJECT = AssetSelection.assets(*project_asset_keys())

lineage_job = define_asset_job("lineage", selection=AssetSelection.all() - PROJECT,
                               description="Materialize the whole lineage for one dataset.")
report_job = define_asset_job("report_all", selection=PROJECT,
                              description="Rebuild the HTML report over every dataset's latest eval.")



def ship_selection(job: str) -> AssetSelection:
    """The assets a ship job materializes: its stages' outputs."""
    return AssetSelection.assets(*(asset_key(output) for name in SHIP_STAGES[job] for output in get_stage(name).outputs))


ship_job = define_asset_job("ship", selection=ship_selection("ship"),
                            description="Evaluate, export and register one dataset's generator (the new_checkpoint sensor's job).")
ship_student_job = define_asset_job(
    "ship_student", selection=ship_selection("ship_student"),
    description="Evaluate, export and register one dataset's distilled student (the new_checkpoint sensor's job).")
SHIP_JOBS = [ship_job, ship_student_job]

JOBS = [lineage_job, *SHIP_JOBS, report_job, nightly_eval]
