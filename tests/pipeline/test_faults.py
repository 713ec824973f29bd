"""Faults and hostile inputs on the tiny profile: kills, concurrent runs, full disks, flipped bytes, crafted pickles.

Each test stands for a promise of README "Guarantees"; each failed on the code before them.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import REPO, run_stage
from tokenline import artifacts
from tokenline.artifacts import DamagedOutputError, read_manifest
from tokenline.cli import app
from tokenline.layout import output_path, work_path
from tokenline.locks import OutputLockedError
from tokenline.tokenizer.token_cache import DamagedTokenCacheError, TokenCache
from tokenline.training import ResumeRefusedError

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes

TESTS = REPO / "tests"  # where conftest.py lives, for the killed subprocess
# Every state folder written from step 2 on, so a kill at any step leaves one to resume from.
EVERY_OTHER_STEP = "tokenizer.train.checkpoint_every=2"


def _copy_project(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def _same_threads() -> dict[str, str]:
    """The environment for a training subprocess: this process's torch thread count, since another
    count sums floats in another order and the checkpoints compared here would differ in their last bits."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def _weights(root: Path, output: str) -> bytes:
    return (output_path(root, "shapes", output) / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    """A tiny shapes project run up to captions and the grid teacher: every tokenizer test starts from a copy."""
    root = tmp_path_factory.mktemp("captioned")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    run_stage(root, "teacher_tokenizer", "shapes")
    return root


@pytest.fixture(scope="module")
def trained(captioned, tmp_path_factory) -> Path:
    """The captioned project with the tokenizer trained once, uninterrupted, state every other step."""
    root = _copy_project(captioned, tmp_path_factory.mktemp("trained") / "project")
    run_stage(root, "tokenizer", "shapes", EVERY_OTHER_STEP)
    return root


# --------------------------------------------------------------------------------------
# Reproducible runs and bit-exact resume
# --------------------------------------------------------------------------------------

KILL_AT_STEP = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from tokenline import training
from conftest import run_stage

kill_at = int(sys.argv[2])
save = training.StepLoop.checkpoint_if_due


def save_then_die(loop):
    save(loop)
    if loop.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


training.StepLoop.checkpoint_if_due = save_then_die
run_stage(Path(sys.argv[1]), "tokenizer", "shapes", {every!r})
"""


def test_two_fresh_tokenizer_runs_give_identical_checkpoints(captioned, trained, tmp_path):
    again = _copy_project(captioned, tmp_path / "again")
    run_stage(again, "tokenizer", "shapes", EVERY_OTHER_STEP)
    assert _weights(again, "tokenizer") == _weights(trained, "tokenizer")


def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_checkpoint(captioned, trained, tmp_path):
    root = _copy_project(captioned, tmp_path / "killed")
    step = random.randint(2, 11)  # a state folder exists from step 2 on
    script = KILL_AT_STEP.format(tests=str(TESTS), every=EVERY_OTHER_STEP)
    killed = subprocess.run([sys.executable, "-c", script, str(root), str(step)], capture_output=True, text=True,
                            env=_same_threads())
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert read_manifest(output_path(root, "shapes", "tokenizer")) is None  # nothing committed
    run_stage(root, "tokenizer", "shapes", EVERY_OTHER_STEP, resume=True)
    assert _weights(root, "tokenizer") == _weights(trained, "tokenizer"), f"killed at step {step}"


def test_two_fresh_generator_runs_give_identical_checkpoints(generator_project, tmp_path):
    root = _copy_project(generator_project, tmp_path / "again")
    run_stage(root, "generator", "shapes", force=True)
    assert _weights(root, "generator") == _weights(generator_project, "generator")


# --------------------------------------------------------------------------------------
# No pickle from an artifact
# --------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_crafted_rng_pickle_in_a_state_folder_is_never_loaded(trained, tmp_path):
    root = _copy_project(trained, tmp_path / "crafted")
    state = work_path(root, "shapes", "tokenizer") / "state"
    marker = tmp_path / "payload-ran"
    (state / "rng.pt").write_bytes(pickle.dumps(_Payload(marker)))
    # Beside the real RNG files: resume reads those, and the pickle stays unread.
    run_stage(root, "tokenizer", "shapes", EVERY_OTHER_STEP, resume=True, force=True)
    assert not marker.exists()
    # An old-format folder, whose only RNG state is the pickle: refused, still unread.
    (state / "rng.safetensors").unlink()
    with pytest.raises(ResumeRefusedError, match="rng.pt"):
        run_stage(root, "tokenizer", "shapes", EVERY_OTHER_STEP, resume=True, force=True)
    assert not marker.exists()


# --------------------------------------------------------------------------------------
# A changed input is noticed; damaged data fails naming the file
# --------------------------------------------------------------------------------------


def _flip(path: Path, offset: int | None = None, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if offset is None else offset
    for index in range(start, min(len(data), start + count)):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("relative, next_stage", [
    ("models/shapes/tokenizer/model.safetensors", "tokens"),
    ("data/shapes/shards/train-000000.tar", "captions"),
    ("data/shapes/captions/captions.jsonl", "tokenizer"),
    ("data/shapes/tokens/train/latents.npy", "generator"),
    ("models/shapes/generator/model.safetensors", "gen_eval"),
])
def test_a_flipped_byte_in_any_artifact_is_named_before_it_is_used(generator_project, tmp_path, relative, next_stage):
    root = _copy_project(generator_project, tmp_path / "flipped")
    _flip(root / relative)
    with pytest.raises(DamagedOutputError) as caught:
        run_stage(root, next_stage, "shapes", force=True)
    message = str(caught.value)
    assert relative in message and "\n" not in message
    writer = read_manifest((root / relative).parent if "/train/" not in relative else root / "data/shapes/tokens")["stage"]
    assert f"tokenline run {writer} --dataset shapes --force" in message


def test_a_forced_rebuild_replaces_its_own_damaged_output(generator_project, tmp_path):
    root = _copy_project(generator_project, tmp_path / "rebuild")
    _flip(root / "data/shapes/captions/captions.jsonl")
    run_stage(root, "captions", "shapes", force=True)
    run_stage(root, "tokenizer", "shapes")  # the rebuilt captions verify; the tokenizer is still fresh
    assert (root / "data/shapes/captions/captions.jsonl").read_bytes() == (
        generator_project / "data/shapes/captions/captions.jsonl").read_bytes()


def test_the_cli_reports_a_damaged_input_in_one_line(generator_project, tmp_path, monkeypatch):
    root = _copy_project(generator_project, tmp_path / "cli")
    _flip(root / "models/shapes/tokenizer/model.safetensors")
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["run", "tokens", "--profile", "tiny", "--dataset", "shapes", "--force",
                                      "--set", "tracking.enabled=false"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.safetensors" in errors[0] and "tokenline run tokenizer" in errors[0]
    assert "Traceback" not in result.output


@pytest.fixture
def cache_copy(generator_project, tmp_path) -> Path:
    folder = tmp_path / "tokens"
    shutil.copytree(generator_project / "data/shapes/tokens", folder)
    return folder


def test_a_truncated_cache_array_is_named_when_the_cache_opens(cache_copy):
    path = cache_copy / "train" / "latents.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DamagedTokenCacheError, match="latents.npy") as caught:
        TokenCache(cache_copy, "train")
    assert "\n" not in str(caught.value)


def test_codes_outside_the_codebook_and_non_finite_latents_are_refused_at_open(cache_copy):
    codes_path = cache_copy / "train" / "codes.npy"
    codes = np.load(codes_path)
    codes[0, 0] = 10**6
    np.save(codes_path, codes)
    with pytest.raises(DamagedTokenCacheError, match="codes.npy.*outside the codebook"):
        TokenCache(cache_copy, "train")
    codes[0, 0] = 0
    np.save(codes_path, codes)
    latents_path = cache_copy / "train" / "latents.npy"
    latents = np.load(latents_path)
    latents[1, 2, 0] = np.nan
    np.save(latents_path, latents)
    with pytest.raises(DamagedTokenCacheError, match="latents.npy.*non-finite"):
        TokenCache(cache_copy, "train")


# --------------------------------------------------------------------------------------
# One writer per output; leftovers swept; resume state kept
# --------------------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from tokenline.locks import hold_lock
with hold_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(folder: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_fails_at_once_naming_the_holder_then_takes_over_a_dead_ones_lock(trained, tmp_path):
    root = _copy_project(trained, tmp_path / "locked")
    folder = output_path(root, "shapes", "shards")
    before = read_manifest(folder)["content_hash"]
    holder = _holder(folder)
    try:
        started = time.perf_counter()
        with pytest.raises(OutputLockedError, match=f"PID {holder.pid} .*started"):
            run_stage(root, "shards", "shapes", force=True)
        assert time.perf_counter() - started < 30  # failed at once, did not wait
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert read_manifest(folder)["content_hash"] == before
    # The holder died holding the lock: the kernel freed it, and the next run takes it.
    run_stage(root, "shards", "shapes", force=True)
    assert read_manifest(folder)["content_hash"] == before  # shards are byte-reproducible


# The first run pauses at a step until the test lets it go: the second run certainly meets it
# mid-training (a tiny tokenizer trains in about two seconds, less than a CLI takes to start).
PAUSE_AT_STEP = """
import sys, time
from pathlib import Path
from tokenline import training
from tokenline.cli import main

reached, release = Path(sys.argv[1]), Path(sys.argv[2])
advance = training.StepLoop.advance


def advance_then_wait(loop, *args):
    advance(loop, *args)
    if loop.step == 4:
        reached.touch()
        while not release.exists():
            time.sleep(0.05)


training.StepLoop.advance = advance_then_wait
sys.argv = ["tokenline", *sys.argv[3:]]
main()
"""


def test_two_concurrent_cli_runs_of_one_stage_leave_one_complete_output(trained, tmp_path):
    root = _copy_project(trained, tmp_path / "concurrent")
    arguments = ["run", "tokenizer", "--profile", "tiny", "--dataset", "shapes", "--force",
                 "--set", "tracking.enabled=false", "--set", EVERY_OTHER_STEP]
    env = _same_threads()
    reached, release = tmp_path / "reached", tmp_path / "release"
    first = subprocess.Popen([sys.executable, "-c", PAUSE_AT_STEP, str(reached), str(release), *arguments],
                             cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not reached.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert reached.exists(), first.stderr.read()[-2000:] if first.poll() is not None else "the first run never reached step 4"
    second = subprocess.run([sys.executable, "-m", "tokenline", *arguments], cwd=root, env=env, capture_output=True, text=True)
    release.touch()
    first_out, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 1
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"PID {first.pid}" in errors[0]
    assert _weights(root, "tokenizer") == _weights(trained, "tokenizer")
    leftovers = [p for p in (root / "models" / "shapes").rglob(".*") if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []


def test_leftovers_of_killed_runs_are_swept_by_the_next_run(trained, tmp_path):
    root = _copy_project(trained, tmp_path / "swept")
    output = output_path(root, "shapes", "shards")
    (output.parent / ".shards.x1y2.tmp").mkdir()
    (output.parent / ".shards.x1y2.tmp" / "train-000000.tar").write_bytes(b"half")
    (output.parent / ".shards.4242.old").mkdir()
    state_temp = work_path(root, "shapes", "tokenizer") / ".state.abcd.tmp"
    state_temp.mkdir()
    run_stage(root, "shards", "shapes", force=True)
    run_stage(root, "tokenizer", "shapes", EVERY_OTHER_STEP, resume=True, force=True)
    assert not (output.parent / ".shards.x1y2.tmp").exists() and not (output.parent / ".shards.4242.old").exists()
    assert not state_temp.exists()


def test_a_failed_fresh_run_keeps_the_resume_state_it_did_not_replace(trained, tmp_path, monkeypatch):
    root = _copy_project(trained, tmp_path / "kept")
    state = work_path(root, "shapes", "tokenizer") / "state"
    before = {path.name: path.read_bytes() for path in state.iterdir()}

    def fails_before_any_state(*args, **kwargs):
        raise RuntimeError("killed before the first state")

    monkeypatch.setattr("accelerate.Accelerator", fails_before_any_state)
    with pytest.raises(RuntimeError, match="before the first state"):
        run_stage(root, "tokenizer", "shapes", EVERY_OTHER_STEP, force=True)
    assert {path.name: path.read_bytes() for path in state.iterdir()} == before


# --------------------------------------------------------------------------------------
# Full disk and other OS errors: old output intact, one line, a FAILED MLflow run
# --------------------------------------------------------------------------------------


def test_a_full_disk_at_commit_keeps_the_old_output_and_fails_the_run_in_one_line(trained, tmp_path, monkeypatch):
    root = _copy_project(trained, tmp_path / "full")
    folder = output_path(root, "shapes", "shards")
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    real_write = artifacts.atomic_write_bytes

    def disk_full_for_manifests(path, data):
        if Path(path).name == artifacts.MANIFEST:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, data)

    monkeypatch.setattr(artifacts, "atomic_write_bytes", disk_full_for_manifests)
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["run", "shards", "--profile", "tiny", "--dataset", "shapes", "--force"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "manifest.json" in errors[0]
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before
    assert [p for p in folder.parent.iterdir() if p.name.endswith((".tmp", ".old"))] == []
    runs = MlflowClient(tracking_uri=store).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=store).search_experiments()], "tags.stage = 'shards'")
    assert [run.info.status for run in runs] == ["FAILED"]


def test_a_run_whose_process_died_is_marked_failed_by_the_next_run(trained, tmp_path, monkeypatch):
    root = _copy_project(trained, tmp_path / "orphan")
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    run_stage(root, "shards", "shapes", force=True, tracking=True)
    client = MlflowClient(tracking_uri=store)
    (finished,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'shards'")
    # A run left RUNNING by a process that was killed: the same tags, never terminated.
    orphan = client.create_run(finished.info.experiment_id, tags={**finished.data.tags, "pid": "999999"})
    run_stage(root, "shards", "shapes", force=True, tracking=True)
    assert client.get_run(orphan.info.run_id).info.status == "FAILED"


# --------------------------------------------------------------------------------------
# Artifacts are readable by the team
# --------------------------------------------------------------------------------------


def test_every_kind_of_output_is_readable_by_group_and_others(generator_project):
    unreadable = []
    for top in ("data", "models"):
        for path in (generator_project / top).rglob("*"):
            wanted = 0o055 if path.is_dir() else 0o044
            if not path.is_symlink() and path.stat().st_mode & wanted != wanted:
                unreadable.append(f"{path.relative_to(generator_project)} {oct(path.stat().st_mode & 0o777)}")
    kinds = {".json", ".png", ".safetensors", ".tar", ".npy", ".jsonl"}
    seen = {path.suffix for path in (generator_project / "data").rglob("*")} | {
        path.suffix for path in (generator_project / "models").rglob("*")}
    assert kinds <= seen
    assert unreadable == []


@pytest.mark.parametrize("error, shown", [
    (PermissionError(errno.EACCES, "Permission denied", "models/shapes/tokenizer/model.safetensors"),
     "PermissionError: [Errno 13] Permission denied: 'models/shapes/tokenizer/model.safetensors'"),
    (FloatingPointError("tokenizer: non-finite loss (nan) at step 3; the last good state is kept"),
     "FloatingPointError: tokenizer: non-finite loss (nan) at step 3"),
])
def test_os_and_numeric_failures_are_one_line_and_verbose_shows_the_traceback(project, monkeypatch, error, shown):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr("tokenline.cli.run_with_upstream", fails)
    monkeypatch.chdir(project)
    arguments = ["run", "tokenizer", "--profile", "tiny", "--dataset", "shapes"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {shown}")
    verbose = CliRunner().invoke(app, [*arguments, "--verbose"])
    assert verbose.exit_code != 0 and verbose.exception is error
