"""DVC: `dvc repro` on tiny works in a fresh clone; `dvc metrics show` and `dvc plots show` read the reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration  # the whole lineage through `dvc repro`


def _git_tracked_clone(target: Path) -> None:
    # A clone of the working tree as committed plus uncommitted tracked changes, so the test
    # checks what CI will check without requiring a commit first.
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True)
    tracked = subprocess.run(["git", "ls-files", "-m"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (target / name).write_bytes((REPO / name).read_bytes())


def _metric_dicts(tree):
    """Every validation report inside DVC's nested metrics JSON."""
    if isinstance(tree, dict):
        if "total" in tree and "accepted" in tree:
            yield tree
        else:
            for child in tree.values():
                yield from _metric_dicts(child)


def test_dvc_repro_in_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    _git_tracked_clone(clone)
    params = clone / "params.yaml"
    params.write_text(params.read_text().replace("\nprofile: cpu\n", "\nprofile: tiny\n", 1))
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'ml.db'}"}
    dvc = os.path.join(bin_dir, "dvc")
    repro = subprocess.run([dvc, "repro"], cwd=clone, env=env, capture_output=True, text=True, timeout=1500)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    for dataset in ("openmoji", "shapes"):
        assert (clone / "data" / dataset / "captions" / "captions.jsonl").exists()
    metrics = subprocess.run([dvc, "metrics", "show", "--json"], cwd=clone, env=env, capture_output=True, text=True, check=True)
    reports = list(_metric_dicts(json.loads(metrics.stdout)))
    assert len(reports) == 2
    for report in reports:
        assert report["total"] == report["accepted"] + report["rejected"] == 48
    # `dvc plots show` reads the very numbers gen_eval reported, and the report covers both datasets.
    plots = json.loads(subprocess.run([dvc, "plots", "show", "--json"], cwd=clone, env=env, capture_output=True,
                                      text=True, check=True).stdout)["data"]
    for dataset in ("openmoji", "shapes"):
        (entry,) = plots[f"data/reports/{dataset}/gen_eval_fid_vs_steps.json"]
        shown = [(row["steps"], row["fid"]) for row in entry["content"]["data"]["values"]]
        report = json.loads((clone / "data" / "reports" / dataset / "gen_eval.json").read_text())
        assert shown == [(row["steps"], row["fid"]) for row in report["sweeps"]["steps"]]
    html = (clone / "data" / "reports" / "report.html").read_text()
    assert html.count("<h2>openmoji</h2>") == html.count("<h2>shapes</h2>") == 1
    status = subprocess.run([dvc, "status"], cwd=clone, env=env, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout
    _push_then_get_the_model(clone, tmp_path, env, dvc)


def _push_then_get_the_model(clone: Path, tmp_path: Path, env: dict, dvc: str) -> None:
    """A downstream team's path: the lineage pushed to the default remote (a folder beside the repo),
    then `dvc get` of the exported model into an empty folder, which `tokenline generate` runs."""
    push = subprocess.run([dvc, "push"], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert push.returncode == 0, push.stdout[-2000:] + push.stderr[-2000:]
    assert any((tmp_path / "tokenline-dvc-store").rglob("*")), "the default remote is a folder beside the repo"
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "add", "dvc.lock"], cwd=clone, check=True)
    subprocess.run([*git, "commit", "-qm", "lineage"], cwd=clone, check=True)
    target = tmp_path / "downstream" / "onnx"
    target.parent.mkdir()
    got = subprocess.run([dvc, "get", str(clone), "models/shapes/onnx", "-o", str(target)], cwd=target.parent, env=env,
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    tokenline = os.path.join(os.path.dirname(dvc), "tokenline")
    made = subprocess.run([tokenline, "generate", "--model", str(target), "--prompt", "a red circle", "--n", "2",
                           "--out", str(tmp_path / "downstream" / "out")], cwd=target.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    assert len(list((tmp_path / "downstream" / "out").glob("0*.png"))) == 2
