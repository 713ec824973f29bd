"""The sensors: a failed run logs its failed stages and marks them in data/reports/failures.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dagster import RunFailureSensorContext, run_failure_sensor

from orchestration.defs.resources import TokenlineResource

FAILURES = Path("data") / "reports" / "failures.jsonl"


def failure_record(context: RunFailureSensorContext) -> dict:
    """What failed: the run, its job and partition, each failed stage (the step of a stage's multi-asset) and its error."""
    run = context.dagster_run
    stages = {}
    for event in context.get_step_failure_events():
        error = event.step_failure_data.error if event.step_failure_data else None
        while error is not None and error.cause is not None:  # Dagster wraps the stage's own error
            error = error.cause
        stages[event.step_key] = error.message.strip().splitlines()[0] if error and error.message else "failed"
    return {
        "run_id": run.run_id,
        "job": run.job_name,
        "partition": run.tags.get("dagster/partition"),
        "stages": stages,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@run_failure_sensor(name="stage_failures", description="Log each failed run's stages and mark them in "
                    "data/reports/failures.jsonl (stage, partition, the error's last line).")
def stage_failure_sensor(context: RunFailureSensorContext, tokenline: TokenlineResource) -> None:
    """Record a failed run: one JSON line per run, appended, with every failed stage's error."""
    record = failure_record(context)
    for stage, error in record["stages"].items():
        context.log.error(f"stage {stage} failed on {record['partition'] or 'every dataset'} "
                          f"(run {record['run_id']}): {error}")
    path = Path(tokenline.root) / FAILURES
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as file:  # one short line per failure: appends do not interleave
        file.write(json.dumps(record, sort_keys=True) + "\n")


SENSORS = [stage_failure_sensor]
