"""The schedules: the nightly re-evaluation of production (02:00), then the report from the latest evals (03:00)."""

from __future__ import annotations

from dagster import RunRequest, ScheduleDefinition, ScheduleEvaluationContext, schedule

from orchestration.defs.jobs import report_job
from orchestration.defs.nightly import nightly_eval

nightly_report = ScheduleDefinition(name="nightly_report", job=report_job, cron_schedule="0 3 * * *",
                                    description="Every night at 03:00: the report from the latest evals.")


@schedule(name="nightly_eval", job=nightly_eval, cron_schedule="0 2 * * *",
          description="Every night at 02:00: re-evaluate each dataset's production model; a dated report in "
                      "data/reports/nightly/<date>/, flagged when it regressed against the night before.")
def nightly_eval_schedule(context: ScheduleEvaluationContext) -> RunRequest:
    """One run per night, keyed and dated by the tick (a missed tick run later still writes its own date)."""
    day = context.scheduled_execution_time.strftime("%Y-%m-%d")
    return RunRequest(run_key=day, run_config={"ops": {"reevaluate_production": {"config": {"day": day}}}})


SCHEDULES = [nightly_eval_schedule, nightly_report]
