"""The registry drives the CLI and dvc.yaml; stages run after stale upstream stages only."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_stage
from tokenline.dvc_yaml import render_dvc_yaml
from tokenline.params_loading import load_params
from tokenline.pipeline import STAGES, get_stage, stage_closure
from tokenline.runner import staleness

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes


def test_committed_dvc_yaml_is_the_generated_one():
    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml(), "regenerate: tokenline dvc-yaml > dvc.yaml"


def test_every_stage_is_in_dvc_yaml_with_its_outputs():
    import yaml

    stages = yaml.safe_load(render_dvc_yaml())["stages"]
    assert list(stages) == [stage.name for stage in STAGES]
    for stage in (s for s in STAGES if s.per_dataset):
        outs = stages[stage.name]["outs"]
        area = "models" if stage.models else "data"
        assert outs == [f"{area}/${{item.dataset}}/{name}" for name in stage.outputs]
        # Each input is a dependency at the path its producer writes.
        for name in stage.inputs:
            producer = next(s for s in STAGES if name in s.outputs)
            assert f"{'models' if name in producer.models else 'data'}/${{item.dataset}}/{name}" in stages[stage.name]["deps"]
    assert stages["tokenizer"]["outs"] == ["models/${item.dataset}/tokenizer"]
    # gen_eval's sweeps are DVC plots with their axes.
    plots = {next(iter(entry)): next(iter(entry.values())) for entry in stages["gen_eval"]["plots"]}
    assert plots["data/reports/${item.dataset}/gen_eval_fid_vs_steps.json"] | {"title": None} == {
        "cache": False, "x": "steps", "y": "fid", "title": None}
    # The report is one stage over params.yaml's active datasets, named one by one.
    report = stages["report"]
    assert "matrix" not in report and report["cmd"] == "tokenline run report --no-upstream --force"
    assert report["deps"][:6] == ["data/openmoji/gen_eval", "data/openmoji/recon_eval", "data/openmoji/student_eval",
                                  "data/shapes/gen_eval", "data/shapes/recon_eval", "data/shapes/student_eval"]
    assert report["outs"] == ["data/report", {"data/reports/report.html": {"cache": False}}]


def test_dvc_yaml_follows_the_active_datasets(tmp_path):
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text()) | {"active_datasets": ["shapes"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    deps = yaml.safe_load(render_dvc_yaml(tmp_path / "params.yaml"))["stages"]["report"]["deps"]
    assert [d for d in deps if d.startswith("data/")] == ["data/shapes/gen_eval", "data/shapes/recon_eval",
                                                          "data/shapes/student_eval"]


def test_closure_is_topological():
    names = [stage.name for stage in stage_closure(get_stage("captions"))]
    assert names == ["raw", "validate", "shards", "captions"]


def test_run_runs_missing_upstream_then_skips_fresh(project):
    first = run_stage(project, "shards", "shapes")
    assert [(run.stage, run.skipped) for run in first] == [("raw", False), ("validate", False), ("shards", False)]
    again = run_stage(project, "shards", "shapes")
    assert all(run.skipped for run in again)
    manifest = json.loads((project / "data/shapes/shards/manifest.json").read_text())
    validated = json.loads((project / "data/shapes/validated/manifest.json").read_text())
    assert manifest["inputs"]["validated"]["hash"] == validated["content_hash"]
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == 48


def test_param_change_reruns_only_affected_stages(project):
    run_stage(project, "shards", "shapes")
    rerun = run_stage(project, "shards", "shapes", "shards.samples_per_shard=5")
    assert [(run.stage, run.skipped) for run in rerun] == [("raw", True), ("validate", True), ("shards", False)]
    index = json.loads((project / "data/shapes/shards/index.json").read_text())
    assert len(index["train"]["shards"]) == -(-index["train"]["samples"] // 5)


def test_changed_upstream_output_makes_downstream_stale(project):
    run_stage(project, "shards", "shapes")
    run_stage(project, "raw", "shapes", "data.limit=20", upstream=False)
    rerun = run_stage(project, "shards", "shapes", "data.limit=20")
    assert [(run.stage, run.skipped) for run in rerun] == [("raw", True), ("validate", False), ("shards", False)]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenline", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_lists_stages_and_prints_dvc_yaml(project):
    listed = _cli("stages", cwd=project)
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines() if not line.startswith(" ")] == [s.name for s in STAGES]
    assert _cli("dvc-yaml", cwd=project).stdout == render_dvc_yaml()


def test_cli_lists_fresh_stages_once_in_its_summary_not_as_log_lines(project):
    """A second run says which stages were fresh in the final table, not in a log line per stage."""
    assert _cli("run", "shards", "--profile", "tiny", "--dataset", "shapes", "--set", "tracking.enabled=false",
                cwd=project).returncode == 0
    again = _cli("run", "shards", "--profile", "tiny", "--dataset", "shapes", "--set", "tracking.enabled=false", cwd=project)
    assert again.returncode == 0 and "skipping" not in again.stderr
    summary = [line.split() for line in again.stdout.splitlines() if line.startswith("shapes")]
    assert [row[1:3] for row in summary] == [["raw", "fresh"], ["validate", "fresh"], ["shards", "fresh"]]
    assert "report:" not in again.stdout  # no report.html yet; `make demo` ends with its path once there is one


def test_cli_shards_on_a_folder_of_broken_files(project, tmp_path):
    """The issue's acceptance command: a user folder of broken files gives counts that add up."""
    from bad_inputs import write_cases

    folder = tmp_path / "broken"
    write_cases(folder)
    source = f"datasets.mine.source=imagefolder:{folder}"
    # A folder names no license of its own: without one the run stops before work, saying how to set it.
    refused = _cli("run", "shards", "--profile", "tiny", "--dataset", "mine", "--set", source, cwd=project)
    assert refused.returncode != 0 and "--set datasets.mine.license=" in refused.stderr
    assert not (project / "data/reports/mine").exists()
    done = _cli("run", "shards", "--profile", "tiny", "--dataset", "mine", "--set", source, "--set", "datasets.mine.license=CC0-1.0", cwd=project)
    assert done.returncode == 0, done.stderr
    report = json.loads((project / "data/reports/mine/validate.json").read_text())
    assert report["total"] == report["accepted"] + report["rejected"] > 0
    assert "license_missing" not in report["reasons"]


def test_cli_bad_param_fails_before_work(project):
    done = _cli("run", "raw", "--profile", "tiny", "--set", "data.resolution=huge", cwd=project)
    assert done.returncode == 2
    assert "data.resolution" in done.stderr
    assert not (project / "data").exists()


def test_cli_unknown_stage(project):
    done = _cli("run", "nosuch", "--profile", "tiny", cwd=project)
    assert done.returncode == 2 and "unknown stage 'nosuch'" in done.stderr


def test_cli_missing_folder_and_missing_input_are_clear(project, tmp_path):
    gone = _cli("run", "raw", "--profile", "tiny", "--dataset", "x", "--set", f"datasets.x.source=imagefolder:{tmp_path / 'nope'}", cwd=project)
    assert gone.returncode == 1 and "is not a folder" in gone.stderr
    orphan = _cli("run", "shards", "--profile", "tiny", "--dataset", "shapes", "--no-upstream", cwd=project)
    assert orphan.returncode == 1 and "has no manifest: run `tokenline run validate --dataset shapes` first" in orphan.stderr


def test_one_dataset_run_and_an_all_datasets_run_agree_on_freshness(tmp_path):
    """`--dataset D` (how DVC and users run one lineage) must not make the outputs of `run all` stale, nor the
    other way round: a per-dataset stage's params hash reads only its own dataset."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    run_stage(tmp_path, "shards", "shapes")  # active_datasets = [shapes]
    everything = load_params(tmp_path / "params.yaml", profile="tiny")  # active_datasets = [openmoji, shapes]
    assert staleness(get_stage("shards"), everything, "shapes", tmp_path) is None
    other = load_params(tmp_path / "params.yaml", profile="tiny", overrides=["datasets.openmoji.license=changed"])
    assert staleness(get_stage("shards"), other, "shapes", tmp_path) is None  # another dataset's spec
    mine = load_params(tmp_path / "params.yaml", profile="tiny", overrides=["datasets.shapes.size=40"])
    assert staleness(get_stage("shards"), mine, "shapes", tmp_path) == "params changed"
