"""Generators over 1D tokens: shapes, the null caption, corruption, decoding, learning a toy mapping, pairing."""

from __future__ import annotations

import json

import pytest
import torch

from tokenline.generator.checkpoint import PairingError, check_pairing, load_generator, save_generator
from tokenline.generator.generate import SamplingOptions, sample_tokens
from tokenline.prompts import clean_prompt
from tokenline.generator.masked_decoding import decode_masked, masked_counts
from tokenline.generator.model import FlowTransformer, GeneratorConfig, MaskedTransformer, TextBatch
from tokenline.generator.objectives import corrupt_codes, flow_matching_loss, masked_token_loss
from tokenline.model_checkpoint import CheckpointError
from tokenline.tokenizer.checkpoint import save_checkpoint
from tokenline.tokenizer.model import Tokenizer_T


def config(**overrides) -> GeneratorConfig:
    values = dict(num_tokens=4, token_dim=2, width=64, depth=2, heads=2, text_dim=8, text_pooled_dim=6, text_tokens=3)
    return GeneratorConfig(**(values | overrides))


def captions(batch: int, seed: int = 0) -> TextBatch:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 3, dtype=torch.bool)
    mask[:, 2] = False  # the last position is padding
    return TextBatch(torch.randn(batch, 3, 8, generator=generator), mask, torch.randn(batch, 6, generator=generator))


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """A model whose zero-initialised (adaLN-zero) layers are not zero, so every input matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


@pytest.mark.parametrize("text_mode", ["cross", "context"])
def test_output_shapes(text_mode):
    flow = FlowTransformer(config(text_mode=text_mode))
    v = flow(torch.randn(5, 4, 2), torch.rand(5), captions(5))
    assert v.shape == (5, 4, 2)
    masked = MaskedTransformer(config(objective="masked", codebook_size=10, text_mode=text_mode))
    logits = masked(torch.randint(0, 11, (5, 4)), captions(5))
    assert logits.shape == (5, 4, 10)


def test_adaln_zero_starts_as_zero_velocity():
    # The zero-initialised head and modulations: an untrained flow predicts no motion at all.
    flow = FlowTransformer(config())
    assert torch.count_nonzero(flow(torch.randn(3, 4, 2), torch.rand(3), captions(3))) == 0


@pytest.mark.parametrize(("text_mode", "text_refiner"), [("cross", 0), ("context", 0), ("cross", 2), ("context", 1)])
def test_dropped_caption_is_the_null_caption(text_mode, text_refiner):
    flow = randomized(FlowTransformer(config(text_mode=text_mode, text_refiner=text_refiner)))
    x, t, text = torch.randn(4, 4, 2), torch.rand(4), captions(4)
    unconditional = flow(x, t, None)
    dropped = flow(x, t, text, drop=torch.ones(4, dtype=torch.bool))
    conditional = flow(x, t, text)
    torch.testing.assert_close(dropped, unconditional, atol=1e-5, rtol=1e-5)
    assert (conditional - unconditional).abs().max() > 1e-3
    # Dropping some rows changes only those rows.
    partly = flow(x, t, text, drop=torch.tensor([True, False, True, False]))
    torch.testing.assert_close(partly[1::2], conditional[1::2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(partly[0::2], unconditional[0::2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text_refiner", [0, 2])
def test_padded_caption_positions_do_not_matter(text_refiner):
    # With the refiner the padding must also be masked inside its self-attention.
    flow = randomized(FlowTransformer(config(text_refiner=text_refiner)))
    x, t, text = torch.randn(2, 4, 2), torch.rand(2), captions(2)
    scribbled = TextBatch(text.states.clone(), text.mask, text.pooled)
    scribbled.states[:, 2] = 100.0  # the padded position
    torch.testing.assert_close(flow(x, t, scribbled), flow(x, t, text))


def test_corrupt_codes_masks_at_least_one_and_keeps_the_rest():
    torch.manual_seed(0)
    codes = torch.randint(0, 50, (256, 16))
    inputs, corrupted = corrupt_codes(codes, mask_id=50, vocab=50)
    assert corrupted.any(dim=1).all()
    assert (inputs[corrupted] == 50).all() and torch.equal(inputs[~corrupted], codes[~corrupted])
    # The cosine schedule masks on average 2/pi of the tokens (the mean of cos(pi/2 u)), plus rounding up.
    assert 0.6 < corrupted.float().mean() < 0.75
    replaced_inputs, replaced_mask = corrupt_codes(codes, mask_id=50, vocab=50, replace_prob=0.5)
    share_masked = (replaced_inputs[replaced_mask] == 50).float().mean()
    assert 0.4 < share_masked < 0.6 and replaced_inputs.max() <= 50


def test_masked_counts_decrease_to_zero():
    for length, steps in ((16, 4), (32, 8), (16, 16), (4, 1)):
        counts = masked_counts(length, steps)
        assert len(counts) == steps and counts[-1] == 0
        assert all(a > b for a, b in zip([length, *counts], counts))


def test_decode_masked_reveals_every_position_and_follows_the_logits():
    target = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])

    def confident(codes):
        logits = torch.full((len(codes), 8, 10), -20.0)
        return logits.scatter(2, target.expand(len(codes), -1)[..., None], 20.0)

    codes = decode_masked(confident, batch=3, length=8, mask_id=10, steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, target.expand(3, -1))


def _toy_task(objective: str):
    """Four captions, each with its own target tokens."""
    text = captions(4, seed=3)
    if objective == "flow":
        targets = torch.tensor([[[1.0, 1.0]] * 4, [[-1.0, 1.0]] * 4, [[1.0, -1.0]] * 4, [[-1.0, -1.0]] * 4])
    else:
        targets = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [1, 1, 1, 1], [7, 6, 5, 4]])
    return text, targets


@pytest.mark.parametrize("objective", ["flow", "masked"])
def test_generator_learns_which_caption_wants_which_tokens(objective):
    torch.manual_seed(0)
    text, targets = _toy_task(objective)
    model = FlowTransformer(config()) if objective == "flow" else MaskedTransformer(config(objective="masked", codebook_size=8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = torch.arange(4).repeat(8)
    batch = TextBatch(text.states[rows], text.mask[rows], text.pooled[rows])
    for _ in range(300):
        if objective == "flow":
            loss = flow_matching_loss(model, targets[rows], batch)
        else:
            loss = masked_token_loss(model, targets[rows], batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    options = SamplingOptions(steps=10, seed=1)
    samples, calls = sample_tokens(model, batch, options)
    expected = targets[rows]
    if objective == "flow":
        nearest = torch.cdist(samples.flatten(1), targets.flatten(1)).argmin(dim=1)
        assert (nearest == rows).float().mean() >= 0.9
        assert calls == 10
    else:
        assert (samples == expected).float().mean() >= 0.9
        assert calls == 10


def test_guidance_doubles_the_evaluations():
    model = randomized(FlowTransformer(config()))
    _, plain = sample_tokens(model, captions(2), SamplingOptions(steps=6))
    _, guided = sample_tokens(model, captions(2), SamplingOptions(steps=6, guidance=3.0))
    assert (plain, guided) == (6, 12)


def test_binary_flow_samples_are_bits():
    model = randomized(FlowTransformer(config(binary=True)))
    samples, _ = sample_tokens(model, captions(3), SamplingOptions(steps=3))
    assert set(samples.unique().tolist()) <= {-1.0, 1.0}


def test_checkpoint_round_trip_and_truncation(tmp_path):
    model = randomized(FlowTransformer(config(latent_mean=[0.5, -0.5], latent_std=[2.0, 3.0], text_refiner=1)))
    save_generator(model, tmp_path / "g")
    loaded = load_generator(tmp_path / "g")
    x, t, text = torch.randn(2, 4, 2), torch.rand(2), captions(2)
    torch.testing.assert_close(loaded(x, t, text), model(x, t, text))
    assert torch.equal(loaded.denormalize(x), model.denormalize(x))
    weights = tmp_path / "g" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(CheckpointError, match=str(weights)):
        load_generator(tmp_path / "g")


def test_a_generator_for_another_tokenizer_is_refused_naming_both(tmp_path):
    save_checkpoint(Tokenizer_T(image_size=32, num_tokens=16, token_dim=8, quantizer="kl"), tmp_path / "tok16")
    save_checkpoint(Tokenizer_T(image_size=32, num_tokens=32, token_dim=6, quantizer="kl"), tmp_path / "tok32")
    save_generator(FlowTransformer(config(num_tokens=16, token_dim=8, quantizer="kl")), tmp_path / "gen")
    check_pairing(tmp_path / "gen", tmp_path / "tok16")
    with pytest.raises(PairingError) as error:
        check_pairing(tmp_path / "gen", tmp_path / "tok32")
    message = str(error.value)
    assert str(tmp_path / "gen") in message and str(tmp_path / "tok32") in message
    assert "K = 16" in message and "latent width 8" in message


def test_config_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="objective"):
        GeneratorConfig(objective="diffusion")
    with pytest.raises(ValueError, match="codebook_size"):
        GeneratorConfig(objective="masked")
    with pytest.raises(ValueError, match="latent_std"):
        GeneratorConfig(token_dim=2, latent_std=[1.0])
    with pytest.raises(ValueError, match="text_refiner"):
        GeneratorConfig(text_refiner=-1)
    with pytest.raises(ValueError, match="unknown generator config fields"):
        GeneratorConfig.from_dict({"colour": 1})
    assert json.loads(json.dumps(config().to_dict())) == config().to_dict()


@pytest.mark.parametrize(
    ("prompt", "cleaned"),
    [
        ("a red\x00circle", "a red circle"),
        ("  a\tblue\n\nsquare\u200b ", "a blue square"),
        ("\x1b[31m", "[31m"),
        ("\x00\x01\x02", ""),
        ("一只红色的圆", "一只红色的圆"),
    ],
)
def test_clean_prompt(prompt, cleaned):
    assert clean_prompt(prompt) == cleaned


def test_clean_prompt_cuts_huge_prompts_and_names_non_strings():
    assert len(clean_prompt("word " * 10_000)) <= 4096
    with pytest.raises(TypeError, match="None"):
        clean_prompt(None)
