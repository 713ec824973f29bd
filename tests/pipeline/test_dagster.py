"""Dagster: every registry stage is an asset; all of them materialize on tiny; the UI serves them."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from dagster import AssetKey, DagsterInstance, Definitions, materialize

from conftest import REPO
from orchestration.defs.assets import build_assets
from orchestration.defs.resources import TokenlineResource
from tokenline.layout import output_path
from tokenline.pipeline import STAGES

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes

ALL_OUTPUTS = {output for stage in STAGES for output in stage.outputs}


def test_definitions_load_with_every_output_as_an_asset(monkeypatch):
    monkeypatch.setenv("TOKENLINE_PROFILE", "tiny")
    from orchestration.definitions import defs

    Definitions.validate_loadable(defs)  # what the webserver checks: e.g. a job named like an asset's op fails here
    graph = defs.resolve_asset_graph()
    assert {key.path[0] for key in graph.get_all_asset_keys()} == ALL_OUTPUTS
    for stage in STAGES:
        for output in stage.outputs:
            node = graph.get(AssetKey([output]))
            assert {key.path[0] for key in node.parent_keys} == set(stage.inputs)
            assert node.group_name == stage.area
            if stage.per_dataset:
                assert node.partitions_def.get_partition_keys() == ["openmoji", "shapes"]
            else:
                assert node.partitions_def is None  # the report reads every dataset's partition
    # A job's assets share one partitioning: the lineage per dataset; the report, nightly, over all of them.
    assert {key.path[0] for key in defs.resolve_job_def("report_all").asset_layer.executable_asset_keys} == {"report"}
    assert "report" not in {key.path[0] for key in defs.resolve_job_def("lineage").asset_layer.executable_asset_keys}
    schedule = defs.resolve_schedule_def("nightly_report")
    assert schedule.job_name == "report_all" and schedule.cron_schedule == "0 3 * * *"
    nightly = defs.resolve_schedule_def("nightly_eval")  # re-evaluates production before the report is drawn
    assert nightly.job_name == "nightly_eval" and nightly.cron_schedule == "0 2 * * *"
    # A new generator ships by `ship`, a new student by `ship_student`, each with its own export and registry.
    assert sorted(job.name for job in defs.resolve_sensor_def("new_checkpoint").jobs) == ["ship", "ship_student"]
    student_ship = {key.path[0] for key in defs.resolve_job_def("ship_student").asset_layer.executable_asset_keys}
    assert student_ship == {"student_eval", "student_onnx", "student_registry"}
    check_names = {key.name for key in graph.asset_check_keys}
    assert {"counts_add_up", "accept_rate", "rejects_have_reasons", "finite_weights", "rfid_below_threshold", "code_usage",
            "fid_below_threshold"} <= check_names


def test_materialize_every_asset_on_tiny(project):
    """Every dataset partition of the lineage, then the report over both, as the Dagster UI would run them."""
    resource = TokenlineResource(root=str(project), profile="tiny", overrides=["tracking.enabled=false"])
    assets = build_assets(["openmoji", "shapes"])
    instance = DagsterInstance.ephemeral()
    partitioned = [a for a in assets if a.partitions_def is not None]
    dataset_outputs = {output for stage in STAGES if stage.per_dataset for output in stage.outputs}
    for dataset in ("openmoji", "shapes"):
        result = materialize(partitioned, resources={"tokenline": resource}, partition_key=dataset, instance=instance)
        assert result.success
        materialized = {event.asset_key.path[0] for event in result.get_asset_materialization_events()}
        assert materialized == dataset_outputs
        checks = {(e.asset_key.path[0], e.check_name): e.passed for e in result.get_asset_check_evaluations()}
        assert checks == {(check.output, check.name): True for stage in STAGES for check in stage.checks}
        assert {name for _, name in checks} == {
            "counts_add_up", "accept_rate", "rejects_have_reasons", "finite_weights", "rfid_below_threshold", "code_usage",
            "fid_below_threshold", "registry_gates", "files_match",
        }
        assert ("generator", "finite_weights") in checks and ("tokenizer", "finite_weights") in checks
        shards_event = next(e for e in result.get_asset_materialization_events() if e.asset_key.path == ["shards"])
        metadata = shards_event.materialization.metadata
        assert metadata["count_train"].value + metadata["count_val"].value == 48
        assert metadata["samples"].value.startswith("![shards samples](data:image/png;base64,")
        for output in dataset_outputs:
            assert (output_path(project, dataset, output) / "manifest.json").exists()
        assert (project / "models" / dataset / "tokenizer" / "model.safetensors").exists()

    (report,) = [a for a in assets if a.partitions_def is None]
    result = materialize([report], resources={"tokenline": resource}, instance=instance)
    assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["datasets"].value == "openmoji, shapes" and metadata["count_datasets"].value == 2
    assert metadata["html_report"].value == str(project / "data" / "reports" / "report.html")
    assert (project / "data" / "reports" / "report.html").read_text().count("<svg") == 4  # the three sweeps and FID vs NFE


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_webserver_serves_the_asset_graph(tmp_path):
    """Start the real dagster-webserver on loopback and read the asset graph over GraphQL."""
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "TOKENLINE_PROFILE": "tiny"}
    webserver = os.path.join(os.path.dirname(sys.executable), "dagster-webserver")
    process = subprocess.Popen(
        [webserver, "-m", "orchestration.definitions", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    query = "{ assetNodes { assetKey { path } groupName dependencyKeys { path } } }"
    try:
        deadline = time.monotonic() + 120
        nodes = None
        while time.monotonic() < deadline and nodes is None:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql",
                    data=json.dumps({"query": query}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=10) as response:
                    nodes = json.loads(response.read())["data"]["assetNodes"]
            except (OSError, KeyError, TypeError):
                time.sleep(1)
        assert nodes is not None, "webserver did not answer within 120 s"
    finally:
        process.terminate()
        process.wait(timeout=30)
    graph = {node["assetKey"]["path"][0]: {dep["path"][0] for dep in node["dependencyKeys"]} for node in nodes}
    assert set(graph) == ALL_OUTPUTS
    assert graph["shards"] == {"validated"} and graph["validated"] == {"raw"}


def _graph_summary(defs) -> dict:
    """Asset keys with group, parents and partitions; checks, jobs, schedules: what users see in the UI."""
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "parents": sorted(parent.to_user_string() for parent in node.parent_keys),
            "partitions": node.partitions_def.get_partition_keys() if node.partitions_def else None,
        }
    return {
        "assets": assets,
        "checks": sorted(f"{key.asset_key.to_user_string()}:{key.name}" for key in graph.asset_check_keys),
        "jobs": sorted(job.name for job in defs.resolve_all_job_defs() if not job.name.startswith("__")),
        "schedules": sorted([s.name, s.job_name, s.cron_schedule] for s in defs.schedules),
        "sensors": sorted(s.name for s in defs.sensors),
    }


def test_the_asset_graph_is_the_committed_snapshot(monkeypatch):
    """Re-layering the code must not move an asset, a dependency, a group, a check, a job or a schedule."""
    monkeypatch.setenv("TOKENLINE_PROFILE", "tiny")
    from orchestration.definitions import defs

    snapshot = json.loads((REPO / "tests" / "snapshots" / "dagster_graph.json").read_text())
    assert _graph_summary(defs) == snapshot


def test_the_failure_sensor_logs_and_marks_the_failed_stage(tmp_path):
    """A materialization that fails in a stage leaves a line naming the stage, the partition and the error."""
    from dagster import DagsterEventType, build_run_status_sensor_context

    from orchestration.defs.sensors import FAILURES, stage_failure_sensor

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    resource = TokenlineResource(root=str(tmp_path), profile="tiny", overrides=[
        "tracking.enabled=false", f"datasets.shapes.source=imagefolder:{tmp_path / 'missing'}", "datasets.shapes.license=CC0-1.0"])
    raw = next(a for a in build_assets(["shapes"]) if a.node_def.name == "raw")
    instance = DagsterInstance.ephemeral()
    result = materialize([raw], resources={"tokenline": resource}, partition_key="shapes", instance=instance,
                         raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.RUN_FAILURE)
    context = build_run_status_sensor_context(
        sensor_name="stage_failures", dagster_event=failure, dagster_instance=instance,
        dagster_run=instance.get_run_by_id(result.run_id), resources={"tokenline": resource},
    ).for_run_failure()
    stage_failure_sensor(context)
    (line,) = (tmp_path / FAILURES).read_text().splitlines()
    record = json.loads(line)
    assert record["partition"] == "shapes" and list(record["stages"]) == ["raw"]
    assert "is not a folder" in record["stages"]["raw"]


def test_the_release_gates_check_on_gen_eval_is_blocking(monkeypatch):
    """A model that fails registry.gates must not reach export and registry in the same Dagster run."""
    monkeypatch.setenv("TOKENLINE_PROFILE", "tiny")
    from orchestration.definitions import defs

    specs = [spec for assets in defs.assets for spec in assets.check_specs if spec.name == "registry_gates"]
    assert [spec.asset_key.to_user_string() for spec in specs] == ["gen_eval"]
    assert specs[0].blocking
