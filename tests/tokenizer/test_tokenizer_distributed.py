"""The training loop under `accelerate launch` with two CPU processes: disjoint data, one writer."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import REPO, run_stage
from tokenline.tokenizer.model import Tokenizer1D
from tokenline.tokenizer.train import ShardImages

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_split_the_data_and_write_one_state(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    run_stage(tmp_path, "shards", "shapes")
    shard_dir = tmp_path / "data" / "shapes" / "shards"
    out_dir, record = tmp_path / "run", tmp_path / "seen"
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launched = subprocess.run(
        # --multi_gpu is accelerate's torchrun path; with no GPU each process runs on CPU over gloo.
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         str(REPO / "tests" / "tokenizer" / "launch" / "train_two_processes.py"), str(shard_dir), str(out_dir), str(record)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"seen.{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["num_processes"] == 2 for r in ranks)
    # 4 steps x batch 4 per process: together the first 32 positions of the one seeded stream.
    stream = iter(ShardImages(shard_dir, seed=0))
    first = [next(stream)[1] for _ in range(32)]
    assert ranks[0]["keys"] == first[0::2][:16] and ranks[1]["keys"] == first[1::2][:16]
    progress = json.loads((out_dir / "state" / "progress.json").read_text())
    assert progress["step"] == 4 and progress["samples_seen"] == 32
    assert ranks[0]["result"]["steps"] == ranks[1]["result"]["steps"] == 4
    Tokenizer1D.from_checkpoint(out_dir / "checkpoint")
