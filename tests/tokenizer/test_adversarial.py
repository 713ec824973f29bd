"""Adversarial training parts: discriminator, hinge losses, adaptive weight, warm-up, perceptual loss."""

from __future__ import annotations

import logging

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn

from tokenline.tokenizer import adversarial
from tokenline.tokenizer.adversarial import (
    PatchDiscriminator,
    VGGPerceptualLoss,
    adaptive_weight,
    adversarial_factor,
    hinge_discriminator_loss,
    hinge_generator_loss,
    load_perceptual_loss,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def images(batch=2, size=32):
    """Random images in [-1, 1]."""
    return torch.rand(batch, 3, size, size) * 2 - 1


# -----------------------------------------------------------------------------
# Discriminator
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("size, side", [(32, 2), (64, 6)])
def test_discriminator_output_shape(size, side):
    disc = PatchDiscriminator(width=16, layers=3)
    assert disc(images(2, size)).shape == (2, 1, side, side)


def test_discriminator_default_width_and_group_counts():
    disc = PatchDiscriminator()
    norms = [m for m in disc.modules() if isinstance(m, nn.GroupNorm)]
    assert [(n.num_groups, n.num_channels) for n in norms] == [(32, 128), (32, 256), (32, 512)]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    # Fewer channels than 32 groups: a divisor of the channel count.
    small = PatchDiscriminator(width=3, layers=2)
    for norm in (m for m in small.modules() if isinstance(m, nn.GroupNorm)):
        assert norm.num_channels % norm.num_groups == 0 and norm.num_groups <= 32


def test_discriminator_init_is_pix2pix():
    weights = torch.cat([m.weight.flatten() for m in PatchDiscriminator().modules() if isinstance(m, nn.Conv2d)])
    assert abs(weights.std().item() - 0.02) < 1e-3
    assert abs(weights.mean().item()) < 1e-3


def test_discriminator_gradient_reaches_input():
    x = images().requires_grad_(True)
    PatchDiscriminator(width=16).forward(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_discriminator_rejects_too_small_input():
    disc = PatchDiscriminator(width=16, layers=3)
    assert disc.min_size == 24
    assert disc(images(1, 24)).shape == (1, 1, 1, 1)  # the minimum still works
    with pytest.raises(ValueError, match=r"16x16.*minimum side is 24"):
        disc(images(1, 16))


# -----------------------------------------------------------------------------
# Losses and weights
# -----------------------------------------------------------------------------

def test_hinge_losses_on_known_logits():
    full = torch.full((2, 1, 3, 3), 1.0)
    assert hinge_discriminator_loss(2 * full, -2 * full).item() == 0.0
    assert hinge_discriminator_loss(0 * full, 0 * full).item() == pytest.approx(1.0)
    # Only the wrong side of the margin costs: real=-1 gives 2, fake=0 gives 1.
    assert hinge_discriminator_loss(-1 * full, 0 * full).item() == pytest.approx(1.5)
    assert hinge_generator_loss(3 * full).item() == pytest.approx(-3.0)


def test_adaptive_weight_balances_gradient_norms():
    w = torch.randn(5, requires_grad=True)
    rec, gen = (2 * w).sum(), (0.5 * w).sum()
    weight = adaptive_weight(rec, gen, w)
    assert weight.item() == pytest.approx(4.0, rel=1e-3)
    assert not weight.requires_grad
    # Both losses can still be backpropagated afterwards.
    (rec + weight * gen).backward()
    assert torch.allclose(w.grad, torch.full((5,), 2 + 0.5 * weight.item()))


def test_adaptive_weight_is_clamped():
    w = torch.randn(5, requires_grad=True)
    weight = adaptive_weight((2 * w).sum(), (1e-9 * w).sum(), w, max_weight=100.0)
    assert weight.item() == 100.0


def test_adversarial_factor_switches_on_at_start():
    assert adversarial_factor(0, 10) == 0.0
    assert adversarial_factor(9, 10) == 0.0
    assert adversarial_factor(10, 10) == 1.0
    assert adversarial_factor(1000, 10) == 1.0


# -----------------------------------------------------------------------------
# Perceptual loss
# -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vgg_features() -> dict[str, torch.Tensor]:
    """A random vgg16().features state dict; built on meta so the classifier is never allocated."""
    with torch.device("meta"):
        features = torchvision.models.vgg16(weights=None).features
    features = features.to_empty(device="cpu")
    torch.manual_seed(1)
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()
    return features.state_dict()


@pytest.fixture
def vgg_file(tmp_path, vgg_features):
    path = tmp_path / "vgg16_features.safetensors"
    safetensors.torch.save_file(vgg_features, str(path))
    return path


@pytest.fixture
def notice():
    """Fresh once-per-process notice before and after the test."""
    adversarial._reset_notice()
    yield
    adversarial._reset_notice()


def test_perceptual_loss_loads_and_measures(vgg_file, vgg_features):
    loss = load_perceptual_loss(vgg_file)
    assert isinstance(loss, VGGPerceptualLoss)
    assert torch.equal(loss.features[0].weight, vgg_features["0.weight"])
    x, noise = images(), torch.randn(2, 3, 32, 32)
    assert loss(x, x).item() == 0.0
    small, large = loss(x, x + 0.05 * noise).item(), loss(x, x + 0.5 * noise).item()
    assert 0.0 < small < large


def test_perceptual_loss_is_frozen_and_passes_gradient(vgg_file):
    loss = load_perceptual_loss(vgg_file)
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.training and not loss.features.training
    x = images().requires_grad_(True)
    loss(x, images()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())


def test_perceptual_loss_accepts_full_vgg_state_dict_from_torch_file(tmp_path, vgg_features):
    full = {f"features.{key}": value for key, value in vgg_features.items()}
    full["classifier.0.weight"] = torch.zeros(2, 2)
    path = tmp_path / "vgg16.pth"
    torch.save(full, path)
    loss = VGGPerceptualLoss(path)
    assert torch.equal(loss.features[28].bias, vgg_features["28.bias"])


def test_perceptual_loss_rejects_mismatching_file(tmp_path, vgg_features):
    state = dict(vgg_features)
    del state["28.bias"]
    state["99.weight"] = torch.zeros(1)
    path = tmp_path / "not_vgg.safetensors"
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(ValueError, match=r"not_vgg\.safetensors.*28\.bias.*99\.weight"):
        load_perceptual_loss(path)


def test_perceptual_loss_rejects_wrong_shapes(tmp_path, vgg_features):
    state = dict(vgg_features, **{"0.bias": torch.zeros(3)})
    path = tmp_path / "bad_shape.safetensors"
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(ValueError, match=r"bad_shape\.safetensors"):
        VGGPerceptualLoss(path)


def test_missing_weights_skip_with_one_notice(tmp_path, caplog, notice):
    with caplog.at_level(logging.WARNING, logger=adversarial.__name__):
        assert load_perceptual_loss(None) is None
        assert load_perceptual_loss(None) is None
        assert load_perceptual_loss(tmp_path / "absent.safetensors") is None
    records = [r for r in caplog.records if r.name == adversarial.__name__]
    assert len(records) == 1
    assert "perceptual loss skipped" in records[0].getMessage()
    assert "tokenizer.train.loss.perceptual_weights" in records[0].getMessage()


def test_missing_file_notice_names_the_path(tmp_path, caplog, notice):
    path = tmp_path / "absent.safetensors"
    with caplog.at_level(logging.WARNING, logger=adversarial.__name__):
        assert load_perceptual_loss(path) is None
    assert str(path) in caplog.text
