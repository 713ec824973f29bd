"""The registry stage: versions, aliases and gates in MLflow's registry; a downstream process loads
@production; the served endpoint answers; `tokenline promote`; bad gates and unknown models."""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO, run_stage
from tokenline.cli import app
from tokenline.config import ConfigError
from tokenline.eval.gates import check_gates, parse_gate
from tokenline.layout import output_path, samples_path
from tokenline.params_loading import load_params

pytestmark = pytest.mark.integration  # runs stages, registers models, starts a server


@pytest.fixture(scope="module")
def registered(generator_project):
    """The shared tiny shapes project registered twice: version 1 passes its gates, version 2 (gated on an
    impossible FID) does not."""
    uri = f"sqlite:///{generator_project / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        run_stage(generator_project, "registry", "shapes")
        first = json.loads((output_path(generator_project, "shapes", "registry") / "registry.json").read_text())
        run_stage(generator_project, "registry", "shapes", 'registry.gates=["fid <= 1"]')
        second = json.loads((output_path(generator_project, "shapes", "registry") / "registry.json").read_text())
    return generator_project, uri, first, second


def test_a_version_that_fails_its_gates_leaves_production_where_it_was(registered):
    _, uri, first, second = registered
    assert first["gates_passed"] and first["production_version"] == first["version"]
    assert not second["gates_passed"] and second["version"] == first["version"] + 1
    assert second["production_version"] == first["version"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert int(client.get_model_version_by_alias("tokenline-shapes", "production").version) == first["version"]
    assert int(client.get_model_version_by_alias("tokenline-shapes", "candidate").version) == second["version"]
    tags = client.get_model_version("tokenline-shapes", str(second["version"])).tags
    assert tags["gates_passed"] == "false" and tags["gate_failures"].startswith("fid = ")
    assert tags["profile"] == "tiny" and len(tags["hash.generator"]) > 8 and "hash.shards" in tags
    assert samples_path(registered[0], "shapes", "registry").is_file()  # what the version draws (a DVC plot)


def test_a_downstream_process_loads_production_and_gets_images(registered, tmp_path):
    _, uri, _, _ = registered
    script = (
        "import base64, io, mlflow\n"
        "from PIL import Image\n"
        "model = mlflow.pyfunc.load_model('models:/tokenline-shapes@production')\n"
        "rows = model.predict(['a red heart', 'a small blue square'], params={'seed': 2})\n"
        "images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in rows['png_base64']]\n"
        "print(len(images), images[0].size)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"})
    assert done.stdout.strip().splitlines()[-1] == "2 (32, 32)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_served_endpoint_answers_prompts_with_images(registered):
    _, uri, _, _ = registered
    port = _free_port()
    bin_dir = os.path.dirname(sys.executable)  # mlflow starts uvicorn by name: the venv's bin must be on PATH
    server = subprocess.Popen(
        [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", "models:/tokenline-shapes@production",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
             "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = json.dumps({"dataframe_split": {"columns": ["prompt"], "data": [["a red circle"], [""]]},
                           "params": {"seed": 1}}).encode()
        answer = None
        for _ in range(120):
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                                 {"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
                break
            except OSError:
                time.sleep(1)
        assert answer is not None, "the endpoint did not answer within 120 s"
    finally:
        server.terminate()
        server.wait(timeout=30)
    rows = answer["predictions"]
    assert [row["prompt"] for row in rows] == ["a red circle", ""]
    assert Image.open(io.BytesIO(base64.b64decode(rows[0]["png_base64"]))).size == (32, 32)


def test_promote_moves_production_only_when_gates_passed_or_forced(registered, monkeypatch):
    root, uri, first, second = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(root)
    refused = CliRunner().invoke(app, ["promote", "shapes", "--version", str(second["version"])])
    assert refused.exit_code == 1 and "failed its gates" in refused.output
    forced = CliRunner().invoke(app, ["promote", "shapes", "--version", str(second["version"]), "--force"])
    assert forced.exit_code == 0, forced.output
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert int(client.get_model_version_by_alias("tokenline-shapes", "production").version) == second["version"]
    back = CliRunner().invoke(app, ["promote", "shapes", "--version", str(first["version"])])
    assert back.exit_code == 0
    unknown = CliRunner().invoke(app, ["promote", "nowhere"])
    assert unknown.exit_code == 1 and "registered models: tokenline-shapes" in unknown.output


def test_gates_read_figures_and_skip_what_a_dataset_lacks():
    assert parse_gate("fid <= 250") == ("fid", "<=", 250.0)
    failures, skipped = check_gates(["fid <= 250", "probe_r1 >= 0.2", "shapes_color_acc >= 0.9"],
                                    {"fid": 260.0, "probe_r1": 0.3})
    assert failures == ["fid = 260, gate <= 250"] and skipped == ["shapes_color_acc >= 0.9"]


def test_a_malformed_gate_fails_at_params_load(project):
    with pytest.raises(ConfigError, match="registry"):
        load_params(project / "params.yaml", profile="tiny", overrides=['registry.gates=["fid < 3"]'])


def test_generate_reads_a_registered_model_and_names_the_aliases_of_an_unknown_one(registered, tmp_path, monkeypatch):
    _, uri, _, _ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    ok = CliRunner().invoke(app, ["generate", "--model", "models:/tokenline-shapes@production", "--prompt", "a red circle",
                                  "--out", str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out" / "0000_a-red-circle.png").is_file()
    missing = CliRunner().invoke(app, ["generate", "--model", "models:/tokenline-shapes@nightly", "--prompt", "x",
                                       "--out", str(tmp_path / "o")])
    assert missing.exit_code == 1 and len(missing.output.strip().splitlines()) == 1
    assert "tokenline-shapes (aliases: candidate, production)" in missing.output


def test_the_gen_eval_gate_check_fails_on_a_missed_gate(registered):
    from tokenline.eval.checks import registry_gates

    root = registered[0]
    manifest = {"dataset": "shapes"}
    strict = load_params(root / "params.yaml", profile="tiny", overrides=['registry.gates=["fid <= 1", "parity_max_abs_diff <= 0.001"]'])
    passed, metadata = registry_gates(root, manifest, strict)
    assert not passed and metadata["failures"].startswith("fid = ")
    assert metadata["skipped"] == "parity_max_abs_diff <= 0.001"  # the export's figure, not gen_eval's
    loose = load_params(root / "params.yaml", profile="tiny", overrides=['registry.gates=["fid <= 100000"]'])
    assert registry_gates(root, manifest, loose)[0]


def test_nightly_reevaluates_production_keeps_each_night_and_flags_a_regression(registered, monkeypatch):
    root, uri, first, _ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias("tokenline-shapes", "production",
                                                                                str(first["version"]))
    nightly = ["nightly", "--dataset", "shapes", "--profile", "tiny", "--params", str(root / "params.yaml")]
    night = root / "data" / "reports" / "nightly"

    one = CliRunner().invoke(app, [*nightly, "--day", "2026-11-28"])
    assert one.exit_code == 0, one.output
    report = json.loads((night / "2026-11-28" / "shapes.json").read_text())
    assert report["version"] == first["version"] and report["previous"] is None and not report["regressed"]
    assert report["figures"]["fid"] > 0 and "shapes_color_acc" in report["figures"]
    assert (night / "2026-11-28" / "shapes.png").is_file() and "first night on record" in one.output

    written = (night / "2026-11-28" / "shapes.json").stat().st_mtime_ns
    again = CliRunner().invoke(app, [*nightly, "--day", "2026-11-28"])
    assert again.exit_code == 0 and "kept from an earlier run" in again.output
    assert (night / "2026-11-28" / "shapes.json").stat().st_mtime_ns == written  # a night's report is never rewritten

    # Same model, data and seed: the same figures, so no regression against the night before.
    two = CliRunner().invoke(app, [*nightly, "--day", "2026-11-29"])
    second = json.loads((night / "2026-11-29" / "shapes.json").read_text())
    assert two.exit_code == 0 and second["previous"]["day"] == "2026-11-28"
    assert second["figures"]["fid"] == pytest.approx(report["figures"]["fid"], rel=1e-6)

    # A previous night that scored far better: today's FID is a regression beyond nightly.max_regression.
    doctored = second | {"figures": second["figures"] | {"fid": second["figures"]["fid"] / 2}}
    (night / "2026-11-29" / "shapes.json").write_text(json.dumps(doctored))
    three = CliRunner().invoke(app, [*nightly, "--day", "2026-11-30"])
    third = json.loads((night / "2026-11-30" / "shapes.json").read_text())
    assert three.exit_code == 1 and "REGRESSED: fid" in three.output
    assert third["regressed"] and third["regressions"][0].startswith("fid ")
    bad_day = CliRunner().invoke(app, [*nightly, "--day", "30/11/2026"])
    assert bad_day.exit_code == 2 and "YYYY-MM-DD" in bad_day.output


def test_the_nightly_schedule_runs_the_dagster_job_for_its_date(registered, monkeypatch):
    from dagster import build_schedule_context

    from orchestration.defs.nightly import nightly_eval
    from orchestration.defs.resources import TokenlineResource
    from orchestration.defs.schedules import nightly_eval_schedule

    root, uri, _, _ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tick = build_schedule_context(scheduled_execution_time=datetime.datetime(2026, 12, 1, 2, 0))
    request = nightly_eval_schedule(tick)
    assert request.run_key == "2026-12-01"
    resource = TokenlineResource(root=str(root), profile="tiny", overrides=["active_datasets=[shapes]"])
    result = nightly_eval.execute_in_process(run_config=request.run_config, resources={"tokenline": resource})
    assert result.success
    report = json.loads((root / "data" / "reports" / "nightly" / "2026-12-01" / "shapes.json").read_text())
    assert report["day"] == "2026-12-01" and report["figures"]["fid"] > 0


def test_a_new_checkpoint_ships_once_and_not_while_a_run_writes(registered, tmp_path):
    from dagster import RunRequest

    from orchestration.defs.sensors import ship_request
    from tokenline.locks import hold_lock

    root = tmp_path / "project"
    shutil.copytree(registered[0], root, ignore=shutil.ignore_patterns("*.lock", "mlflow.db"))
    shipped = ['registry.gates=["fid <= 1"]']  # the params the registered fixture last shipped with
    params = load_params(root / "params.yaml", profile="tiny", overrides=shipped, dataset="shapes")
    assert "already shipped" in ship_request(params, "shapes", root)

    newer = [*shipped, "generator.train.steps=10"]  # a retrained generator: a new checkpoint
    run_stage(root, "generator", "shapes", *newer)
    params = load_params(root / "params.yaml", profile="tiny", overrides=newer, dataset="shapes")
    request = ship_request(params, "shapes", root)
    assert isinstance(request, RunRequest) and request.partition_key == "shapes"
    checkpoint = json.loads((output_path(root, "shapes", "generator") / "manifest.json").read_text())["content_hash"]
    assert request.run_key == f"ship-shapes-{checkpoint[:12]}" and request.job_name == "ship"
    with hold_lock(output_path(root, "shapes", "onnx")):
        assert "a run is writing onnx" in ship_request(params, "shapes", root)


def test_the_gpu_check_script_runs_on_a_cpu_machine_saying_what_it_skipped(registered, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(registered[0], root, ignore=shutil.ignore_patterns("*.lock", "mlflow.db"))
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--root", str(root)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "export: built nothing (fresh)" in done.stdout and "parity: max |torch - onnxruntime| = " in done.stdout
    assert "skipped: onnxruntime on CUDA" in done.stdout and "skipped: bf16 training steps on CUDA" in done.stdout
    assert "onnxruntime cpu: batch 1: " in done.stdout and done.stdout.strip().endswith("gpu_check: done")


def test_the_student_ships_as_its_own_model_and_the_sensor_ships_a_new_one(registered, tmp_path, monkeypatch):
    from dagster import RunRequest

    from orchestration.defs.sensors import ship_request
    from tokenline.distill.checkpoint import read_card
    from tokenline.export.runtime import read_pipeline

    root = tmp_path / "project"
    shutil.copytree(registered[0], root, ignore=shutil.ignore_patterns("*.lock", "mlflow.db"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = load_params(root / "params.yaml", profile="tiny", dataset="shapes")
    assert ship_request(params, "shapes", root, "ship_student") == "shapes: no student checkpoint yet"

    run_stage(root, "student_registry", "shapes")  # student, student_eval, student_export on the way
    result = json.loads((output_path(root, "shapes", "student_registry") / "registry.json").read_text())
    assert result["model"] == "tokenline-shapes-student" and result["version"] == 1
    # The export samples at the student's own steps and sampler, unguided, from the student's weights.
    spec, card = read_pipeline(output_path(root, "shapes", "student_onnx")), read_card(output_path(root, "shapes", "student"))
    assert (spec["generator"]["steps"], spec["generator"]["sampler"], spec["generator"]["guidance"]) == \
        (card.steps, card.sampler, 1.0)
    student_hash = json.loads((output_path(root, "shapes", "student") / "manifest.json").read_text())["content_hash"]
    assert spec["sources"]["generator"] == student_hash and spec["parity"]["max_abs_diff"] <= 1e-3
    tags = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("tokenline-shapes-student", "1").tags
    assert tags["hash.student_onnx"] and tags["hash.student"] == student_hash and "eval.fid_ratio" in tags
    assert "hash.generator" in tags  # the teacher, through the student's manifest
    assert "already shipped" in ship_request(params, "shapes", root, "ship_student")

    retrained = load_params(root / "params.yaml", profile="tiny", overrides=["student.train.steps=6"], dataset="shapes")
    run_stage(root, "student", "shapes", "student.train.steps=6")
    request = ship_request(retrained, "shapes", root, "ship_student")
    new_hash = json.loads((output_path(root, "shapes", "student") / "manifest.json").read_text())["content_hash"]
    assert isinstance(request, RunRequest) and request.job_name == "ship_student"
    assert request.run_key == f"ship_student-shapes-{new_hash[:12]}"
    generator_shipped = load_params(root / "params.yaml", profile="tiny", dataset="shapes",
                                    overrides=['registry.gates=["fid <= 1"]', "student.train.steps=6"])
    assert "already shipped" in ship_request(generator_shipped, "shapes", root, "ship")  # the generator did not change
