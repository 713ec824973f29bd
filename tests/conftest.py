"""Shared fixtures: an isolated project folder per test, tiny params, no stray MLflow store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tokenline.params_loading import load_params
from tokenline.pipeline import get_stage
from tokenline.runner import run_with_upstream

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items):
    """A slow test is an integration test too, so `-m "not integration"` stays the fast unit run."""
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path_factory, monkeypatch):
    """Point MLflow at a throwaway SQLite store shared by the session."""
    store = tmp_path_factory.getbasetemp() / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """Tiny 32 px shapes shards, built once per test module by tokenline's own pipeline."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    run_stage(root, "shards", "shapes")
    return root / "data" / "shapes" / "shards"


@pytest.fixture
def project(tmp_path) -> Path:
    """A project folder holding a copy of the repo's params.yaml."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def patch_of(index: int, patch: int = 8, grid: int = 8) -> tuple[slice, slice]:
    """Pixel rows and columns of image patch `index` in raster order."""
    row, col = divmod(index, grid)
    return slice(row * patch, (row + 1) * patch), slice(col * patch, (col + 1) * patch)


def run_stage(root: Path, stage: str, dataset: str, *overrides: str, tracking: bool = False, **kwargs):
    """Run `stage` (and stale upstream stages) on `dataset` with the tiny profile."""
    sets = [*overrides] + ([] if tracking else ["tracking.enabled=false"])
    params = load_params(root / "params.yaml", profile="tiny", overrides=sets, dataset=dataset)
    return run_with_upstream(get_stage(stage), params, dataset, root, **kwargs)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module of small-tensor tests (threads stall on a busy 2-core machine)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def generator_project(tmp_path_factory):
    """One tiny shapes project run through the generator stage (vq tokenizer -> masked generator), shared by modules."""
    root = tmp_path_factory.mktemp("generator_project")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    with pytest.MonkeyPatch.context() as patch:  # _isolated_mlflow is per test
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        run_stage(root, "generator", "shapes")
    return root
