"""`tokenizer.init` and `generator.init`: training stages that start from another project's checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_stage
from tokenline.artifacts import read_manifest
from tokenline.generator.checkpoint import load_generator
from tokenline.layout import output_path
from tokenline.model_checkpoint import CheckpointError
from tokenline.pipeline import get_stage
from tokenline.runner import MissingInputError, staleness
from tokenline.tokenizer.model import Tokenizer1D, on_decoder_side
from tokenline.tokenizer.token_cache import TokenCache

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes


def test_a_generator_starts_from_the_init_checkpoint(generator_project, project):
    start = output_path(generator_project, "shapes", "generator")
    # One step at a vanishing learning rate: the result is the start's weights, not a fresh model's.
    sets = (f"generator.init={start}", "generator.train.steps=1", "generator.train.lr=1e-12")
    run_stage(project, "generator", "shapes", *sets)
    out = output_path(project, "shapes", "generator")
    started, trained = load_generator(start).state_dict(), load_generator(out).state_dict()
    assert all(torch.allclose(started[name], trained[name], atol=1e-6) for name in started)
    manifest = read_manifest(out)
    assert manifest["inputs"]["init"]["hash"] == read_manifest(start)["content_hash"]
    training = json.loads((out / "training.json").read_text())
    assert training["init"] == str(start)

    params = _params(project, *sets)
    assert staleness(get_stage("generator"), params, "shapes", project) is None
    # The start checkpoint retrained in place makes the fine-tune stale.
    manifest_path = start / "manifest.json"
    original = manifest_path.read_text()
    try:
        manifest_path.write_text(original.replace(read_manifest(start)["content_hash"], "0" * 16))
        assert staleness(get_stage("generator"), params, "shapes", project) == "inputs changed"
    finally:
        manifest_path.write_text(original)


def test_an_init_of_another_architecture_is_refused_naming_the_field(generator_project, project):
    start = output_path(generator_project, "shapes", "generator")
    with pytest.raises(CheckpointError, match=r"depth 2 there, 1 by params"):
        run_stage(project, "generator", "shapes", f"generator.init={start}", "generator.model.depth=1")


def test_an_init_that_is_no_stage_output_is_refused(project, tmp_path):
    with pytest.raises(MissingInputError, match=r"generator\.init names .*no generator stage output"):
        run_stage(project, "generator", "shapes", f"generator.init={tmp_path / 'nowhere'}")


def test_a_decoder_fine_tune_from_init_keeps_the_encoder_side(generator_project, project):
    start = output_path(generator_project, "shapes", "tokenizer")
    run_stage(project, "tokenizer", "shapes", f"tokenizer.init={start}", "tokenizer.train.freeze_encoder=true",
              "tokenizer.train.steps=3")
    started = Tokenizer1D.from_checkpoint(start).state_dict()
    tuned = Tokenizer1D.from_checkpoint(output_path(project, "shapes", "tokenizer")).state_dict()
    encoder_side = [name for name in started if not on_decoder_side(name)]
    decoder_side = [name for name in started if on_decoder_side(name)]
    assert encoder_side and all(torch.equal(started[name], tuned[name]) for name in encoder_side)
    assert any(not torch.equal(started[name], tuned[name]) for name in decoder_side)


def _params(root, *sets):
    from tokenline.params_loading import load_params

    return load_params(root / "params.yaml", profile="tiny", overrides=["tracking.enabled=false", *sets],
                       dataset="shapes")


def test_a_flow_fine_tune_keeps_its_starts_latent_statistics_when_resumed(project, tmp_path):
    flow = ("generator.objective=flow",)
    run_stage(project, "generator", "shapes", *flow)
    start = output_path(project, "shapes", "generator")
    tuned_root = tmp_path / "tuned"
    tuned_root.mkdir()
    (tuned_root / "params.yaml").write_text((project / "params.yaml").read_text())
    # Another seed, so the fine-tune's own token cache has other statistics than the start's.
    sets = (*flow, f"generator.init={start}", "datasets.shapes.seed=5")
    run_stage(tuned_root, "generator", "shapes", *sets)
    run_stage(tuned_root, "generator", "shapes", *sets, "generator.train.steps=16", resume=True, force=True)
    started = load_generator(start).config
    tuned = load_generator(output_path(tuned_root, "shapes", "generator")).config
    cache_mean, _ = TokenCache(output_path(tuned_root, "shapes", "tokens")).latent_statistics()
    assert tuned.latent_mean == started.latent_mean != cache_mean
    assert tuned.latent_std == started.latent_std
    assert json.loads((output_path(tuned_root, "shapes", "generator") / "training.json").read_text())["steps"] == 16
