"""The schedules: the nightly report."""

from __future__ import annotations

from dagster import ScheduleDefinition

from orchestration.defs.jobs import report_job

nightly_report = ScheduleDefinition(name="nightly_report", job=report_job, cron_schedule="0 3 * * *",
                                    description="Every night at 03:00: the report from the latest evals.")

SCHEDULES = [nightly_report]
