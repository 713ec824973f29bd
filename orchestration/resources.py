"""The Dagster resource that turns a run's settings into tokenline params."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource

from tokenline.config import Params, load_params

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_profile() -> str | None:
    """TOKENLINE_PROFILE, else params.yaml's own `profile`."""
    return os.environ.get("TOKENLINE_PROFILE") or None


class TokenlineResource(ConfigurableResource):
    """Which project, profile and overrides the assets run with."""

    root: str = str(PROJECT_ROOT)
    profile: str | None = None
    overrides: list[str] = []

    def params(self, dataset: str | None = None) -> Params:
        """Validated params for one dataset partition."""
        return load_params(Path(self.root) / "params.yaml", self.profile, self.overrides, dataset=dataset)
