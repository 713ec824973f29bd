"""One state for three drivers (tokenline run, dvc repro, Dagster) in a fresh clone on tiny; DVC's reports and remote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetCheckKey, AssetKey, DagsterInstance

from conftest import REPO
from tokenline.pipeline import STAGES

pytestmark = pytest.mark.integration  # the whole lineage through `dvc repro`


def _git_tracked_clone(target: Path) -> None:
    # A clone of the working tree as committed plus uncommitted changes, so the test
    # checks what CI will check without requiring a commit first.
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True)
    # Modified tracked files and new files git does not ignore: the tree the next commit would hold.
    changed = subprocess.run(["git", "ls-files", "-m", "-o", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for name in changed:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes((REPO / name).read_bytes())


def _metric_dicts(tree):
    """Every validation report inside DVC's nested metrics JSON."""
    if isinstance(tree, dict):
        if "total" in tree and "accepted" in tree:
            yield tree
        else:
            for child in tree.values():
                yield from _metric_dicts(child)


def test_one_state_for_tokenline_dvc_and_dagster(tmp_path):
    """Whichever driver builds a stage, the others see it built: `tokenline run all` records each stage in
    dvc.lock and in the project's Dagster home, `dvc repro` then has nothing to do, and after `dvc repro` of a
    changed param `tokenline run all` finds everything fresh. Then DVC's reports and a downstream pull."""
    clone = tmp_path / "clone"
    _git_tracked_clone(clone)
    params = clone / "params.yaml"
    params.write_text(params.read_text().replace("\nprofile: cpu\n", "\nprofile: tiny\n", 1))
    bin_dir = os.path.dirname(sys.executable)
    env = {key: value for key, value in os.environ.items() if key not in ("DAGSTER_HOME", "DVC_STAGE", "DVC_ROOT")}
    env.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'ml.db'}"})
    dvc, tokenline = os.path.join(bin_dir, "dvc"), os.path.join(bin_dir, "tokenline")

    built = subprocess.run([tokenline, "run", "all"], cwd=clone, env=env, capture_output=True, text=True, timeout=1500)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    status = subprocess.run([dvc, "status"], cwd=clone, env=env, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout[-3000:]
    repro = subprocess.run([dvc, "repro"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    assert "Running stage" not in repro.stdout, repro.stdout[-3000:]
    _assert_dagster_saw_the_lineage(clone, driver="tokenline run")

    # DVC rebuilds what a param change touches; tokenline then finds every output fresh.
    params.write_text(params.read_text().replace("title: tokenline generation report", "title: nightly lineage", 1))
    repro = subprocess.run([dvc, "repro"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    assert "Running stage 'report'" in repro.stdout and repro.stdout.count("Running stage") == 1, repro.stdout[-3000:]
    again = subprocess.run([tokenline, "run", "all"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    states = [line.split()[2] for line in again.stdout.splitlines() if line.split()[:1] in (["openmoji"], ["shapes"], ["(all)"])]
    assert states and set(states) == {"fresh"}, again.stdout
    assert "nightly lineage" in (clone / "data" / "reports" / "report.html").read_text()
    _assert_dagster_saw_the_lineage(clone, driver="dvc repro", asset="report")

    _assert_dvc_reports_read_the_lineage(clone, env, dvc)
    _push_then_get_the_model(clone, tmp_path, env, dvc)


def _assert_dagster_saw_the_lineage(clone: Path, driver: str, asset: str | None = None) -> None:
    """The project's Dagster home holds a materialization of every output the CLI built (every partition),
    the latest of `asset` made by `driver`, and the gates check's verdict on gen_eval."""
    with DagsterInstance.from_config(str(clone / ".dagster_home")) as instance:
        for stage in STAGES:
            for output in stage.outputs:
                if stage.per_dataset:
                    assert instance.get_materialized_partitions(AssetKey([output])) == {"openmoji", "shapes"}, output
                else:
                    assert instance.get_latest_materialization_event(AssetKey([output])) is not None, output
        if asset is not None:
            event = instance.get_latest_materialization_event(AssetKey([asset]))
            assert event.asset_materialization.description == f"built by {driver}"
        checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [AssetCheckKey(AssetKey(["gen_eval"]), "registry_gates")])
        assert checks, "the blocking gates check was reported with gen_eval"


def _assert_dvc_reports_read_the_lineage(clone: Path, env: dict, dvc: str) -> None:
    """`dvc metrics show` and `dvc plots show` read the reports the stages wrote."""
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
