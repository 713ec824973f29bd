"""The tokenizer stages end to end on tiny: checkpoint, token cache, recon report, MLflow, resume, checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, run_stage
from tokenline.artifacts import read_manifest
from tokenline.params_loading import load_params
from tokenline.eval import checks as eval_checks
from tokenline.layout import output_path, report_path
from tokenline.pipeline import get_stage
from tokenline.runner import staleness
from tokenline.tokenizer import checks
from tokenline.tokenizer.model import Tokenizer1D
from tokenline.tokenizer.token_cache import StaleTokenCacheError, TokenCache

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny shapes project run through recon_eval with MLflow on (module-scoped: it trains)."""
    root = tmp_path_factory.mktemp("tokenizer_project")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    uri = f"sqlite:///{root / 'runs.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        run_stage(root, "recon_eval", "shapes", tracking=True)
        run_stage(root, "tokens", "shapes", tracking=True)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    return root, uri


def test_checkpoint_lands_under_models_and_loads(built):
    root, _ = built
    folder = root / "models" / "shapes" / "tokenizer"
    manifest = read_manifest(folder)
    assert manifest["stage"] == "tokenizer" and manifest["counts"]["steps"] == 12
    model = Tokenizer1D.from_checkpoint(folder)
    params = load_params(root / "params.yaml", profile="tiny")
    assert model.config.num_tokens == params.tokenizer.num_tokens == 16 and model.config.image_size == 32
    training = json.loads((folder / "training.json").read_text())
    assert training["steps"] == 12 and training["train"]["batch_size"] == 8
    assert set(manifest["inputs"]) == {"shards", "captions", "teacher_tokenizer"}


def test_token_cache_matches_the_shards_and_the_tokenizer(built):
    root, _ = built
    shards = read_manifest(output_path(root, "shapes", "shards"))["counts"]
    tokens = read_manifest(output_path(root, "shapes", "tokens"))
    assert tokens["counts"]["train"] == shards["train"] and tokens["counts"]["val"] == shards["val"]
    tokenizer_hash = read_manifest(output_path(root, "shapes", "tokenizer"))["content_hash"]
    cache = TokenCache(output_path(root, "shapes", "tokens"), "train", expect_tokenizer_hash=tokenizer_hash)
    row = cache[0]
    assert row["latents"].shape == (16, 8) and row["codes"].shape == (16,)
    # The cached codes decode to the cached latents: the cache is the tokenizer's own encoding.
    model = Tokenizer1D.from_checkpoint(output_path(root, "shapes", "tokenizer"))
    assert torch.allclose(model.quantizer.decode_codes(row["codes"][None])[0], row["latents"], atol=1e-5)
    with pytest.raises(StaleTokenCacheError, match=tokenizer_hash):
        TokenCache(output_path(root, "shapes", "tokens"), "train", expect_tokenizer_hash="0" * 16)


def test_recon_report_has_every_number_with_its_protocol(built):
    root, _ = built
    report = json.loads(report_path(root, "shapes", "recon_eval").read_text())
    for key in ("psnr", "ssim", "rfid", "tokens_per_image", "bits_per_image", "code_usage", "perplexity", "protocol"):
        assert key in report, key
    assert report["tokens_per_image"] == 16 and report["bits_per_image"] == pytest.approx(16 * 6)  # 64 codes: 6 bits
    assert 0 < report["code_usage"] <= 1 and report["rfid"] >= 0 and 0 < report["psnr"] < 60
    assert report["tokenizer_hash"] == read_manifest(output_path(root, "shapes", "tokenizer"))["content_hash"]
    assert (output_path(root, "shapes", "recon_eval") / "reconstructions.png").exists()


def test_training_losses_and_reconstructions_reach_mlflow(built):
    _, uri = built
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tokenline")
    runs = {run.data.tags["stage"]: run for run in client.search_runs([experiment.experiment_id])}
    run = runs["tokenizer"]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [point.step for point in history] == [4, 8, 12]  # log_every 4 in the tiny profile
    assert client.get_metric_history(run.info.run_id, "generator")  # the GAN switched on at step 6
    assert "samples/reconstructions.png" in {item.path for item in client.list_artifacts(run.info.run_id, "samples")}
    assert "rfid" in runs["recon_eval"].data.metrics


def test_a_new_tokenizer_makes_the_token_cache_stale(built, tmp_path):
    root, _ = built
    project = tmp_path / "p"
    shutil.copytree(root, project, ignore=shutil.ignore_patterns("runs.db", "mlartifacts"))
    params = load_params(project / "params.yaml", profile="tiny", overrides=["tracking.enabled=false"], dataset="shapes")
    assert staleness(get_stage("tokens"), params, "shapes", project) is None
    run_stage(project, "tokenizer", "shapes", "tokenizer.train.seed=1")
    reseeded = load_params(project / "params.yaml", profile="tiny", overrides=["tracking.enabled=false", "tokenizer.train.seed=1"], dataset="shapes")
    assert staleness(get_stage("tokens"), reseeded, "shapes", project) in ("inputs changed", "params changed")


def test_asset_checks_catch_non_finite_weights_and_thresholds(built, tmp_path):
    root, _ = built
    params = load_params(root / "params.yaml", profile="tiny")
    manifest = read_manifest(output_path(root, "shapes", "tokenizer"))
    assert checks.finite_weights(root, manifest, params)[0]
    recon_manifest = read_manifest(output_path(root, "shapes", "recon_eval"))
    assert eval_checks.rfid_below_threshold(root, recon_manifest, params)[0]
    strict = load_params(root / "params.yaml", profile="tiny", overrides=["recon_eval.max_rfid=0.001", "recon_eval.min_code_usage=1.0"])
    assert not eval_checks.rfid_below_threshold(root, recon_manifest, strict)[0]
    assert not eval_checks.code_usage(root, recon_manifest, strict)[0]

    broken = tmp_path / "broken"
    (broken / "models" / "shapes").mkdir(parents=True)
    shutil.copytree(output_path(root, "shapes", "tokenizer"), broken / "models" / "shapes" / "tokenizer")
    weights = broken / "models" / "shapes" / "tokenizer" / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    tensors["pixel_decoder.to_pixels.weight"][0, 0] = float("nan")  # tiny is two-stage: the teacher's decoder copy
    safetensors.torch.save_file(tensors, weights)
    passed, metadata = checks.finite_weights(broken, manifest, params)
    assert not passed and "pixel_decoder.to_pixels.weight" in metadata["non_finite"]


def _cli(project, *args):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-m", "tokenline", "run", "tokenizer", "--profile", "tiny", "--dataset", "shapes",
         "--set", "tracking.enabled=false", *args],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )


def test_cli_resume_continues_and_refuses_a_changed_config(built, tmp_path):
    root, _ = built
    project = tmp_path / "p"
    shutil.copytree(root, project, ignore=shutil.ignore_patterns("runs.db", "mlartifacts"))
    longer = _cli(project, "--resume", "--set", "tokenizer.train.steps=14")
    assert longer.returncode == 0, longer.stderr[-2000:]
    progress = json.loads((project / "models" / "shapes" / "tokenizer.work" / "state" / "progress.json").read_text())
    assert progress["step"] == 14
    # The bar starts at the resumed step, not at 0.
    assert "12/14" in longer.stderr and " 0/14" not in longer.stderr
    changed = _cli(project, "--resume", "--set", "tokenizer.train.steps=16", "--set", "tokenizer.train.lr=0.01")
    assert changed.returncode == 1 and "train.lr" in changed.stderr and "tokenizer.work" in changed.stderr
    forced = _cli(project, "--resume", "--force", "--set", "tokenizer.train.steps=16", "--set", "tokenizer.train.lr=0.01")
    assert forced.returncode == 0, forced.stderr[-2000:]


def test_text_conditioned_tokenizer_runs_through_recon_eval(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    run_stage(tmp_path, "recon_eval", "shapes", "tokenizer.text_conditioning=true", "tokenizer.train.steps=4")
    model = Tokenizer1D.from_checkpoint(output_path(tmp_path, "shapes", "tokenizer"))
    assert model.config.text_dim == 384 and model.config.text_tokens == 16
    report = json.loads(report_path(tmp_path, "shapes", "recon_eval").read_text())
    assert report["text_conditioning"] is True and report["psnr"] > 0


def test_cli_names_a_truncated_tokenizer_checkpoint(built, tmp_path):
    root, _ = built
    project = tmp_path / "p"
    shutil.copytree(root, project, ignore=shutil.ignore_patterns("runs.db", "mlartifacts"))
    weights = project / "models" / "shapes" / "tokenizer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "tokenline", "run", "tokens", "--profile", "tiny", "--dataset", "shapes",
         "--set", "tracking.enabled=false", "--no-upstream", "--force"],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 1 and str(weights) in result.stderr and "Traceback" not in result.stderr
