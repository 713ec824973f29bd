"""The README's commands work as written: every shell block marked `<!-- runnable -->` runs on a fresh project."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration

MARKED_BLOCK = re.compile(r"<!-- runnable -->\s*```bash\n(.*?)```", re.S)


def runnable_blocks() -> list[str]:
    """The bash blocks the README marks as runnable, in order."""
    return MARKED_BLOCK.findall((REPO / "README.md").read_text())


def test_the_readme_marks_runnable_blocks_and_stays_short():
    assert len(runnable_blocks()) >= 2
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("block", runnable_blocks())
def test_a_runnable_readme_block_succeeds_in_a_fresh_project(block, tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    # `set -e`: a failing line fails the block, as a user pasting it would notice.
    done = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{block}\n{done.stderr[-3000:]}"
