"""The 1D tokenizer: quantizers one by one, then the model, checkpoints, and a tiny overfit."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tokenline.tokenizer.checkpoint import CONFIG, WEIGHTS, CheckpointError, load_checkpoint, save_checkpoint
from tokenline.tokenizer.model import TOKENIZER_SIZES, Tokenizer1D, Tokenizer_T, TokenizerConfig
from tokenline.tokenizer.quantizers import (
    QUANTIZERS,
    BinaryQuantizer,
    KLQuantizer,
    SoftVectorQuantizer,
    VectorQuantizer,
    build_quantizer,
    kl_divergence,
)

KINDS = ["vq", "softvq", "binary", "kl"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def images(batch=4, size=32):
    """Smooth random images in [-1, 1]: low-resolution noise, upsampled."""
    low = torch.rand(batch, 3, 4, 4) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


# -----------------------------------------------------------------------------
# Every quantizer
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_quantizer_shapes_and_codes(kind):
    quantizer = build_quantizer(kind, 12, **({"codebook_size": 64} if kind in ("vq", "softvq") else {}))
    z = torch.randn(3, 16, 12)
    out = quantizer(z)
    assert quantizer.kind == kind
    assert out.latents.shape == (3, 16, 12)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert all(t.ndim == 0 for t in out.terms.values())
    if kind in ("vq", "softvq"):
        assert out.codes.shape == (3, 16) and out.codes.dtype == torch.long
        assert out.codes.max() < 64
    elif kind == "binary":
        assert out.codes.shape == (3, 16, 12) and out.codes.dtype == torch.bool
    else:
        assert out.codes is None


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_the_encoder(kind):
    model = Tokenizer_T(image_size=32, num_tokens=16, quantizer=kind, codebook_size=64)
    x = images(4)
    reconstruction, quantized = model(x)
    (F.mse_loss(reconstruction, x) + quantized.loss).backward()
    for param in (model.patchify.weight, model.latent_tokens, model.encoder.blocks[0].qkv.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_unknown_quantizer_kind():
    with pytest.raises(ValueError, match="vq, softvq, binary, kl"):
        build_quantizer("fsq", 12)
    with pytest.raises(ValueError, match="vq, softvq, binary, kl"):
        TokenizerConfig(quantizer="fsq")
    with pytest.raises(ValueError, match="'vq' quantizer"):
        build_quantizer("vq", 12, temperature=0.5)
    assert set(QUANTIZERS) == set(KINDS)


# -----------------------------------------------------------------------------
# vq
# -----------------------------------------------------------------------------

def compass_vq(**options) -> VectorQuantizer:
    """Four codes on the unit circle: east, north, west, south."""
    vq = VectorQuantizer(2, codebook_size=4, **options)
    vq.codebook.data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    return vq


def test_vq_picks_the_cosine_nearest_code():
    vq = compass_vq().eval()
    # Length must not matter (cosine), only direction.
    z = torch.tensor([[[5.0, 0.4], [0.1, 0.2], [-0.3, -0.1], [0.2, -9.0]]])
    out = vq(z)
    assert out.codes.tolist() == [[0, 1, 2, 3]]
    assert torch.equal(out.latents, vq.codebook.data[out.codes])
    assert torch.equal(vq.encode_codes(z), out.codes)


def test_vq_straight_through_gradient():
    z = torch.randn(2, 8, 12, requires_grad=True)
    VectorQuantizer(12, codebook_size=32)(z).latents.sum().backward()
    assert z.grad.abs().sum() > 0


def test_vq_usage_stats_and_perplexity():
    vq = VectorQuantizer(8, codebook_size=16).train()
    assert vq.usage_stats()["usage"] == 0.0  # nothing picked yet
    for _ in range(20):
        out = vq(torch.randn(8, 16, 8))
    stats = vq.usage_stats()
    assert 0 < stats["usage"] <= 1
    assert 1 <= stats["perplexity"] <= 16
    assert 1 <= out.terms["perplexity"] <= 16
    # Every token on one code: batch perplexity 1.
    assert vq.eval()(vq.codebook.data[:1].expand(4, 16, 8)).terms["perplexity"].item() == pytest.approx(1.0)


def test_vq_restarts_dead_codes():
    vq = compass_vq(restart_every=0, dead_after=5).train()
    near_east = torch.tensor([1.0, 0.0]) + 0.1 * torch.randn(4, 8, 2)
    for _ in range(5):
        vq(near_east)
    assert vq.usage_stats()["usage"] == 0.25  # only code 0 picked
    west = vq.codebook.data[2].clone()
    assert vq.restart_dead_codes(near_east) == 3
    pool = near_east.reshape(-1, 2)
    for code in (1, 2, 3):
        assert (vq.codebook.data[code] - pool).abs().sum(-1).min() == 0  # now a batch vector
    assert not torch.equal(vq.codebook.data[2], west)
    assert vq.restart_dead_codes(near_east) == 0  # the restarted codes get a grace period


def test_vq_restarts_from_forward_every_n_steps():
    vq = compass_vq(restart_every=5, dead_after=3).train()
    near_east = torch.tensor([1.0, 0.0]) + 0.1 * torch.randn(4, 8, 2)
    before = vq.codebook.data.clone()
    for _ in range(4):
        vq(near_east)
    assert torch.equal(vq.codebook.data, before)
    vq(near_east)  # step 5: codes 1-3 idle for 4 steps >= 3
    assert torch.equal(vq.codebook.data[0], before[0])
    assert not torch.equal(vq.codebook.data[1:], before[1:])


# -----------------------------------------------------------------------------
# softvq, binary, kl
# -----------------------------------------------------------------------------

def test_softvq_low_temperature_approaches_hard_vq():
    hard = VectorQuantizer(12, codebook_size=32).eval()
    z = torch.randn(2, 16, 12)
    hard_out = hard(z)
    gaps = []
    for tau in (1.0, 1e-2, 1e-6):
        soft = SoftVectorQuantizer(12, codebook_size=32, tau=tau).eval()
        soft.codebook.data = hard.codebook.data.clone()
        soft_out = soft(z)
        assert torch.equal(soft_out.codes, hard_out.codes)  # argmax is the nearest code
        gaps.append((soft_out.latents - hard_out.latents).abs().max().item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-5, gaps
    # A warm softmax mixes codes: latents fall inside the unit ball.
    warm = SoftVectorQuantizer(12, codebook_size=32, tau=1.0)(z)
    assert warm.latents.norm(dim=-1).max() < 0.99


def test_softvq_is_differentiable_with_entropy():
    soft = SoftVectorQuantizer(12, codebook_size=32, entropy_weight=0.1).train()
    z = torch.randn(2, 16, 12, requires_grad=True)
    out = soft(z)
    (out.latents.sum() + out.loss).backward()
    assert z.grad.abs().sum() > 0 and soft.codebook.grad.abs().sum() > 0
    assert 1 <= soft.usage_stats()["perplexity"] <= 32


@pytest.mark.parametrize("options", [{}, {"estimator": "identity"}, {"stochastic": True}])
def test_binary_latents_are_exactly_plus_minus_one(options):
    binary = BinaryQuantizer(12, **options).train()
    z = torch.randn(4, 16, 12, requires_grad=True)
    out = binary(z)
    assert torch.all(out.latents.abs() == 1)
    assert torch.equal(out.latents, binary.decode_codes(out.codes))
    out.latents.sum().backward()
    assert z.grad.abs().sum() > 0


def test_binary_balance_term_prefers_balanced_bits():
    binary = BinaryQuantizer(12).eval()
    signs = torch.tensor([1.0, -1.0]).repeat(4)[:, None, None]  # half the batch +, half -
    balanced = binary(2 * signs.expand(8, 16, 12)).terms["balance"]
    constant = binary(torch.full((8, 16, 12), 2.0)).terms["balance"]
    assert balanced < 1e-6 < constant
    binary.train()(2 * signs.expand(8, 16, 12))
    assert binary.usage_stats()["bit_balance"] == pytest.approx(1.0)


def test_kl_eval_is_deterministic_and_train_samples():
    kl = KLQuantizer(12)
    z = torch.randn(2, 16, 12)
    kl.eval()
    assert torch.equal(kl(z).latents, kl(z).latents)
    kl.train()
    assert not torch.equal(kl(z).latents, kl(z).latents)


def test_kl_is_zero_for_a_standard_normal_posterior():
    assert kl_divergence(torch.zeros(2, 16, 12), torch.zeros(2, 16, 12)).item() == 0.0
    assert kl_divergence(torch.ones(2, 16, 12), torch.zeros(2, 16, 12)).item() == pytest.approx(6.0)
    kl = KLQuantizer(12)
    torch.nn.init.zeros_(kl.moments.weight)
    torch.nn.init.zeros_(kl.moments.bias)
    assert kl(torch.randn(2, 16, 12)).terms["kl"].item() == 0.0


# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("tokens", [16, 32])
def test_forward_shapes(size, tokens):
    model = Tokenizer_T(image_size=size, num_tokens=tokens)
    reconstruction, quantized = model(images(2, size))
    assert reconstruction.shape == (2, 3, size, size)
    assert reconstruction.abs().max() <= 1
    assert quantized.latents.shape == (2, tokens, 12)
    assert quantized.codes.shape == (2, tokens)


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="num_tokens"):
        TokenizerConfig(num_tokens=24)
    with pytest.raises(ValueError, match="patch_size"):
        TokenizerConfig(image_size=60, patch_size=8)
    with pytest.raises(ValueError, match="unknown tokenizer config fields"):
        TokenizerConfig.from_dict({"depht": 3})
    config = TokenizerConfig(quantizer="binary", quantizer_options={"stochastic": True}, text_dim=16)
    assert TokenizerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert set(TOKENIZER_SIZES) == {"T", "S", "B"}


def captioned():
    """A text-conditioned tiny tokenizer, two images, and captions with padding at the end."""
    model = Tokenizer_T(image_size=32, num_tokens=16, text_dim=16, text_tokens=8).eval()
    states = torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    return model, images(2), states, mask


def test_text_changes_the_reconstruction():
    model, x, states, mask = captioned()
    with torch.no_grad():
        base = model(x, (states, mask))[0]
        other = model(x, {"states": torch.randn_like(states), "mask": mask})[0]
    assert not torch.allclose(base, other)
    # The text encoder's output object works as is.
    encoding = SimpleNamespace(pooled=states.mean(1), tokens=states, mask=mask)
    with torch.no_grad():
        assert torch.equal(model(x, encoding)[0], base)


def test_padded_text_tokens_are_ignored():
    model, x, states, mask = captioned()
    changed = torch.where(mask[..., None], states, torch.randn_like(states) * 100)
    with torch.no_grad():
        base, base_q = model(x, (states, mask))
        same, same_q = model(x, (changed, mask))
        # More padding than text_tokens allows is cut, also harmless.
        longer = model(x, (torch.cat([states, states], 1), torch.cat([mask, torch.zeros_like(mask)], 1)))[0]
    assert torch.equal(base, same) and torch.equal(base_q.codes, same_q.codes)
    assert torch.allclose(base, longer, atol=1e-6)


def test_missing_or_unexpected_text():
    model, x, _, _ = captioned()
    with pytest.raises(ValueError, match="text-conditioned"):
        model(x)
    with pytest.raises(ValueError, match=r"text states must be \[2, T, 16\]"):
        model(x, (torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="no text conditioning"):
        Tokenizer_T(image_size=32, num_tokens=16)(x, (torch.randn(2, 4, 16), torch.ones(2, 4)))


@pytest.mark.parametrize("kind", ["vq", "binary"])
def test_decode_codes_matches_decode(kind):
    model = Tokenizer_T(image_size=32, num_tokens=16, quantizer=kind, codebook_size=64).eval()
    x = images(2)
    with torch.no_grad():
        quantized = model.encode(x)
        assert torch.equal(model.decode_codes(quantized.codes), model.decode(quantized.latents))


def test_decode_codes_refused_for_kl():
    model = Tokenizer_T(image_size=32, num_tokens=16, quantizer="kl").eval()
    with pytest.raises(NotImplementedError, match="no discrete codes"):
        model.decode_codes(torch.zeros(1, 16, dtype=torch.long))


# -----------------------------------------------------------------------------
# Checkpoints
# -----------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    model = Tokenizer_T(image_size=32, num_tokens=16, quantizer="vq", codebook_size=64).train()
    model(images(4))  # moves the vq usage buffers off their initial values
    model.eval()
    save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG, WEIGHTS]  # no temp files left
    loaded = Tokenizer1D.from_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training
    x = images(2)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
    assert torch.equal(loaded.quantizer.usage, model.quantizer.usage)


def test_truncated_weights_name_the_file(tmp_path):
    save_checkpoint(Tokenizer_T(image_size=32, num_tokens=16), tmp_path)
    weights = tmp_path / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=WEIGHTS):
        load_checkpoint(tmp_path)


def test_mismatched_config_names_the_files(tmp_path):
    save_checkpoint(Tokenizer_T(image_size=32, num_tokens=16), tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    (tmp_path / CONFIG).write_text(json.dumps(config | {"num_tokens": 32}))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS} does not match .*{CONFIG}: shape mismatch: latent_pos"):
        load_checkpoint(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps(config | {"depth": 3}))
    with pytest.raises(CheckpointError, match=r"missing: decoder\.blocks\.2\."):
        load_checkpoint(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps(config | {"depth": 1}))
    with pytest.raises(CheckpointError, match=r"unexpected: decoder\.blocks\.1\."):
        load_checkpoint(tmp_path)
    (tmp_path / CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match=CONFIG):
        load_checkpoint(tmp_path)


# -----------------------------------------------------------------------------
# Learning
# -----------------------------------------------------------------------------

def test_tiny_tokenizer_overfits_eight_images():
    model = Tokenizer_T(image_size=32, num_tokens=16, codebook_size=256).train()
    x = images(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    with torch.no_grad():
        initial = F.mse_loss(model(x)[0], x).item()
    for _ in range(150):
        reconstruction, quantized = model(x)
        mse = F.mse_loss(reconstruction, x)
        optimizer.zero_grad()
        (mse + quantized.loss).backward()
        optimizer.step()
    assert mse.item() < 0.5 * initial, (initial, mse.item())
