"""tokenline's Dagster definitions, one concept a module: assets (built from the registry), jobs, schedules, sensors, resources."""
