"""The grid layout of the tokenizer: one latent per image patch (the 2D baseline of benchmarks/grid_vs_1d.py)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, patch_of, run_stage
from tokenline.artifacts import read_manifest
from tokenline.config import ConfigError
from tokenline.params_loading import load_params
from tokenline.runner import check_params
from tokenline.tokenizer.checkpoint import CONFIG, load_checkpoint, save_checkpoint
from tokenline.tokenizer.model import Tokenizer1D, TokenizerConfig

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes

GRID = dict(image_size=64, patch_size=8, width=64, depth=2, heads=2, num_tokens=64, layout="grid")


@pytest.fixture(autouse=True)
def _seed(one_torch_thread):
    torch.manual_seed(0)


def grid_tokenizer(**overrides) -> Tokenizer1D:
    """An untrained grid tokenizer at 64 px, patch 8 (8 x 8 = 64 latents), in eval mode."""
    return Tokenizer1D(TokenizerConfig(**(GRID | overrides))).eval()


@pytest.mark.parametrize("quantizer", ["kl", "vq", "binary"])
def test_grid_encode_and_decode_shapes(quantizer):
    model = grid_tokenizer(quantizer=quantizer, token_dim=8, codebook_size=32)
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        quantized = model.encode(images)
        decoded = model.decode(quantized.latents)
    assert quantized.latents.shape == (3, 64, 8)
    assert decoded.shape == (3, 3, 64, 64) and decoded.abs().max() <= 1
    assert not hasattr(model, "latent_tokens") and not hasattr(model, "mask_token")


def test_grid_with_text_conditioning():
    model = grid_tokenizer(quantizer="kl", text_dim=16, text_tokens=4)
    text = (torch.randn(2, 6, 16), torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool))
    with torch.no_grad():
        reconstruction, quantized = model(torch.rand(2, 3, 64, 64) * 2 - 1, text)
    assert quantized.latents.shape == (2, 64, 12) and reconstruction.shape == (2, 3, 64, 64)


def test_grid_num_tokens_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match=r"8x8 = 64 latents, but num_tokens is 32"):
        TokenizerConfig(**(GRID | {"num_tokens": 32}))
    with pytest.raises(ValueError, match=r"4x4 = 16 latents, but num_tokens is 64"):
        TokenizerConfig(**(GRID | {"image_size": 32}))
    with pytest.raises(ValueError, match="unknown tokenizer layout 'raster'"):
        TokenizerConfig(layout="raster")


def test_params_select_the_grid_and_refuse_a_mismatch():
    from tokenline.tokenizer.spec import tokenizer_config

    params = load_params(REPO / "params.yaml", profile="cpu", overrides=[
        "tokenizer.model.layout=grid", "tokenizer.num_tokens=64", "tokenizer.quantizer=kl"])
    config = tokenizer_config(params, text_dim=0)
    assert (config.layout, config.num_tokens, config.grid) == ("grid", 64, 8)
    with pytest.raises(ConfigError, match=r"64 latents, but num_tokens is 32"):
        check_params(load_params(REPO / "params.yaml", profile="cpu", overrides=["tokenizer.model.layout=grid"]))


def test_old_config_without_layout_loads_as_1d(tmp_path):
    old = Tokenizer1D(TokenizerConfig(width=64, depth=2, heads=2, codebook_size=32)).eval()
    folder = save_checkpoint(old, tmp_path / "old")
    saved = json.loads((folder / CONFIG).read_text())
    assert "layout" not in saved  # 1d configs are written exactly as before the layout field
    loaded = load_checkpoint(folder)
    assert loaded.config.layout == "1d" and loaded.config == old.config
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(images)[0], old(images)[0])


def test_grid_checkpoint_round_trip(tmp_path):
    model = grid_tokenizer(quantizer="kl")
    folder = save_checkpoint(model, tmp_path / "grid")
    assert json.loads((folder / CONFIG).read_text())["layout"] == "grid"
    loaded = load_checkpoint(folder)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(images).latents, model.encode(images).latents)


@pytest.mark.parametrize("index", [0, 19, 63])  # 19 = row 2, column 3: a transposed order would answer 26
def test_grid_latents_are_spatial(index):
    model = grid_tokenizer(quantizer="kl")
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    changed = images.clone()
    rows, cols = patch_of(index)
    changed[:, :, rows, cols] = -changed[:, :, rows, cols]
    with torch.no_grad():
        delta = (model.encode(changed).latents - model.encode(images).latents).norm(dim=-1)[0]
    assert int(delta.argmax()) == index
    others = torch.cat([delta[:index], delta[index + 1 :]])
    assert delta[index] > 3 * others.max()


@pytest.mark.parametrize("index", [0, 19, 63])
def test_grid_decoder_paints_each_latent_at_its_patch(index):
    model = grid_tokenizer(quantizer="kl")
    latents = torch.randn(1, 64, 12)
    changed = latents.clone()
    changed[0, index] += 3.0
    with torch.no_grad():
        delta = (model.decode(changed) - model.decode(latents)).abs().sum(dim=1)[0]  # [64, 64] pixels
    per_patch = torch.stack([delta[patch_of(i)].sum() for i in range(64)])
    assert int(per_patch.argmax()) == index


def test_1d_latents_are_not_a_patch_grid():
    """The control for the spatial test: a 1d tokenizer's K = 64 latents have no patch each."""
    model = Tokenizer1D(TokenizerConfig(**(GRID | {"layout": "1d"}))).eval()
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    hits = 0
    for index in (0, 19, 63):
        changed = images.clone()
        rows, cols = patch_of(index)
        changed[:, :, rows, cols] = -changed[:, :, rows, cols]
        with torch.no_grad():
            delta = (model.encode(changed).latents - model.encode(images).latents).norm(dim=-1)[0]
        hits += int(delta.argmax()) == index
    assert hits < 3



def run_grid_pipeline(project, stage: str) -> None:
    """Run `stage` on tiny shapes with a kl grid tokenizer (32 px / patch 8 = 4 x 4 = K 16) and check the tokenizer and cache."""
    from tokenline.layout import output_path
    from tokenline.tokenizer.token_cache import TokenCache

    run_stage(project, stage, "shapes", "tokenizer.quantizer=kl", "tokenizer.model.layout=grid",
              "tokenizer.train.proxy_steps=0")  # a grid tokenizer trains on pixels (it is what a teacher is)
    tokenizer = load_checkpoint(output_path(project, "shapes", "tokenizer"))
    assert (tokenizer.config.layout, tokenizer.config.num_tokens) == ("grid", 16)
    cache = TokenCache(output_path(project, "shapes", "tokens"), "train")
    assert cache.meta["num_tokens"] == 16 and cache.meta["tokenizer_config"]["layout"] == "grid"
    assert read_manifest(output_path(project, "shapes", "generator"))["counts"]["steps"] == 12


def test_grid_tokenizer_trains_a_generator_through_the_pipeline(project):
    """tokens and generator (with its pairing check) take a grid tokenizer unchanged."""
    run_grid_pipeline(project, "generator")


@pytest.mark.slow
def test_grid_tokenizer_through_gen_eval(project):
    """gen_eval scores a generator on a grid tokenizer unchanged."""
    from tokenline.layout import report_path

    run_grid_pipeline(project, "gen_eval")
    report = json.loads(report_path(project, "shapes", "gen_eval").read_text())
    assert report["protocol"]["objective"] == "flow" and report["fid"] >= 0
