"""The Dagster code location: `dagster dev -m orchestration.definitions`. It only assembles orchestration/defs/."""

from __future__ import annotations

from dagster import Definitions

from orchestration.defs.assets import build_assets
from orchestration.defs.jobs import JOBS
from orchestration.defs.resources import TokenlineResource, active_datasets, default_profile
from orchestration.defs.schedules import SCHEDULES
from orchestration.defs.sensors import SENSORS

_resource = TokenlineResource(profile=default_profile())

defs = Definitions(
    assets=build_assets(active_datasets(_resource)),
    jobs=JOBS,
    schedules=SCHEDULES,
    sensors=SENSORS,
    resources={"tokenline": _resource},
)
