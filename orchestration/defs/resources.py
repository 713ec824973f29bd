"""The Dagster resource that turns a run's settings into tokenline params."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource

from tokenline.config import Params
from tokenline.params_loading import load_params

PROJECT_ROOT = Path(__file__).resolve().parents[2]


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


def active_datasets(resource: TokenlineResource) -> list[str]:
    """The datasets the resource's profile makes active: the partitions of every per-dataset asset.

    Read when the code location loads, because Dagster fixes static partitions then; a changed
    profile takes effect on "Reload definitions". (Dynamic partitions would avoid the read but
    would have to be kept in step with params by hand, and an asset of a dataset no profile
    names could be materialized.)
    """
    return resource.params().active_datasets
