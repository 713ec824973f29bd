"""tokenline's Dagster code location: assets built from the stage registry (no ML logic here)."""
