"""Layout "1d-mix": K 1D tokens formed by a learned, input-independent mix of the patch positions."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import patch_of, run_stage
from tokenline.tokenizer.checkpoint import CONFIG, load_checkpoint, save_checkpoint
from tokenline.tokenizer.model import Tokenizer1D, TokenizerConfig, block_assignment, space_to_heads

MIX = dict(image_size=64, patch_size=8, width=64, depth=2, heads=4, num_tokens=32, layout="1d-mix")


@pytest.fixture(autouse=True)
def _one_thread_and_seed(one_torch_thread):
    torch.manual_seed(0)


def mix_tokenizer(**overrides) -> Tokenizer1D:
    """An untrained 1d-mix tokenizer at 64 px, patch 8 (64 patches), K = 32, in eval mode."""
    return Tokenizer1D(TokenizerConfig(**(MIX | overrides))).eval()


@pytest.mark.parametrize("quantizer", ["kl", "vq", "softvq", "binary"])
def test_mix_encodes_k_tokens_and_decodes_images(quantizer):
    model = mix_tokenizer(quantizer=quantizer, token_dim=8, codebook_size=32)
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        quantized = model.encode(images)
        decoded = model.decode(quantized.latents)
    assert quantized.latents.shape == (3, 32, 8)
    assert decoded.shape == (3, 3, 64, 64) and decoded.abs().max() <= 1
    # no attention routing: neither TiTok's latent tokens nor its mask token exist
    assert not hasattr(model, "latent_tokens") and not hasattr(model, "mask_token")


@pytest.mark.parametrize(("tokens", "block"), [(32, (1, 2)), (16, (2, 2)), (8, (2, 4))])
def test_each_token_starts_from_a_block_of_neighbouring_patches(tokens, block):
    assignment = block_assignment(8, tokens)
    assert assignment.shape == (tokens, 64)
    assert torch.equal(assignment.sum(0), torch.ones(64))  # every patch in exactly one token
    for row in assignment:
        patches = row.nonzero().flatten()
        rows, columns = patches // 8, patches % 8
        assert (int(rows.max() - rows.min()) + 1, int(columns.max() - columns.min()) + 1) == block


def test_more_tokens_than_patches_start_at_patch_k_mod_patches():
    assignment = block_assignment(8, 128)
    assert torch.equal(assignment.argmax(1), torch.arange(128) % 64)


def test_the_heads_of_a_token_split_its_block_instead_of_averaging_it():
    start = space_to_heads(block_assignment(8, 16), heads=4)  # 2 x 2 blocks, 4 heads: one patch a head
    assert start.shape == (4, 16, 64)
    assert [int(start[h, 0].argmax()) for h in range(4)] == [0, 1, 8, 9]
    assert torch.equal(start.sum(-1), torch.ones(4, 16))


@pytest.mark.parametrize("index", [0, 19, 63])  # patch 19 (row 2, column 3) starts in token 2 * 4 + 1 = 9
def test_a_patch_changes_its_blocks_token_most_at_init(index):
    model = mix_tokenizer(quantizer="kl")
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    changed = images.clone()
    rows, cols = patch_of(index)
    changed[:, :, rows, cols] = -changed[:, :, rows, cols]
    with torch.no_grad():
        delta = (model.encode(changed).latents - model.encode(images).latents).norm(dim=-1)[0]
    row, column = divmod(index, 8)
    assert int(delta.argmax()) == row * 4 + column // 2


def test_mix_with_text_conditioning_and_checkpoint_round_trip(tmp_path):
    model = mix_tokenizer(quantizer="kl", text_dim=16, text_tokens=4)
    text = (torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    folder = save_checkpoint(model, tmp_path / "mix")
    assert json.loads((folder / CONFIG).read_text())["layout"] == "1d-mix"
    loaded = load_checkpoint(folder)
    with torch.no_grad():
        assert torch.equal(loaded(images, text)[0], model(images, text)[0])


def test_mix_learns_to_reconstruct_a_small_batch():
    model = mix_tokenizer(quantizer="kl", num_tokens=16).train()
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        reconstruction, quantized = model(images)
        loss = F.mse_loss(reconstruction, images) + quantized.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.integration
def test_a_mix_tokenizer_trains_two_stage_through_the_pipeline(project):
    """The tiny profile's two-stage recipe (teacher, proxy steps, pixel steps) and the token cache take 1d-mix."""
    from tokenline.layout import output_path
    from tokenline.tokenizer.token_cache import TokenCache

    run_stage(project, "tokens", "shapes", "tokenizer.quantizer=kl", "tokenizer.model.layout=1d-mix")
    tokenizer = load_checkpoint(output_path(project, "shapes", "tokenizer"))
    assert tokenizer.config.layout == "1d-mix" and tokenizer.config.teacher is not None
    cache = TokenCache(output_path(project, "shapes", "tokens"), "train")
    assert cache.meta["tokenizer_config"]["layout"] == "1d-mix" and cache.meta["num_tokens"] == 16
