"""Reconstruction metrics: PSNR/SSIM/rFID on known image pairs, code statistics on known codes, and a run
of an untrained tokenizer over a tiny shapes shards folder."""

from __future__ import annotations

import math
import shutil
import warnings

import pytest
import torch

from conftest import REPO
from tokenline.params_loading import load_params
from tokenline.eval import reconstruction as rec
from tokenline.pipeline import get_stage
from tokenline.runner import run_with_upstream
from tokenline.tokenizer.model import Tokenizer_T

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes

IMAGE_METRICS = rec.image_metrics  # the real one, kept before any test monkeypatches it
RESULT_KEYS = {"psnr", "ssim", "rfid", "samples", "tokens_per_image", "bits_per_image", "code_usage", "split"}


@pytest.fixture(scope="module")
def fid_cache(tmp_path_factory):
    """One throwaway weights cache per module: the Inception conversion runs once, never in ~/.cache."""
    return tmp_path_factory.mktemp("tokenline-cache")


@pytest.fixture(autouse=True)
def _cache_and_quiet(fid_cache, monkeypatch):
    """Use the module cache; silence torch.jit / torchmetrics deprecation chatter the tests do not check."""
    monkeypatch.setenv("TOKENLINE_CACHE", str(fid_cache))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _smooth_images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """[n, 3, size, size] in [-1, 1]: upsampled 4x4 noise, so Inception sees blobs rather than static."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _noisy(images: torch.Tensor, std: float, seed: int = 100) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (images + std * torch.randn(images.shape, generator=gen)).clamp(-1, 1)


@pytest.fixture(scope="module")
def noise_metrics():
    """image_metrics for identical images and for Gaussian noise of std 0.05 and 0.3 (three FIDs, computed once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = _smooth_images()
        pairs = {std: _noisy(images, std) if std else images.clone() for std in (0, 0.05, 0.3)}
        return {std: rec.image_metrics(images, noisy) for std, noisy in pairs.items()}


# -----------------------------------------------------------------------------
# image_metrics
# -----------------------------------------------------------------------------

def test_identical_images_are_perfect(noise_metrics):
    """No error: PSNR is infinite, SSIM 1 and rFID 0 up to the eigenvalue round-off of a rank-7 covariance."""
    same = noise_metrics[0]
    assert same["psnr"] == math.inf and isinstance(same["psnr"], float)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-6)
    # Observed about -1e-4 on these 8 images (sqrt of tiny complex eigenvalues of a singular product).
    assert isinstance(same["rfid"], float) and abs(same["rfid"]) < 1e-2
    assert same["samples"] == 8 and "rfid_note" not in same


def test_more_noise_is_worse_on_every_metric(noise_metrics):
    """std 0.3 noise loses PSNR and SSIM and gains rFID against std 0.05."""
    mild, strong = noise_metrics[0.05], noise_metrics[0.3]
    for values in (mild, strong):
        assert all(isinstance(values[key], float) and math.isfinite(values[key]) for key in ("psnr", "ssim", "rfid"))
    # PSNR of std-sigma noise on a unit range is about -20 log10(sigma / 2) dB (clipping lowers the error a bit).
    assert 30 < mild["psnr"] < 36 and 15 < strong["psnr"] < 22
    assert strong["ssim"] < mild["ssim"] < 1.0
    assert strong["rfid"] > mild["rfid"] + 20 > 20


def test_fid_needs_two_images():
    """One image: PSNR/SSIM still computed, rFID None with a note saying why."""
    image = _smooth_images(n=1)
    values = rec.image_metrics(image, _noisy(image, 0.1))
    assert values["rfid"] is None and "at least 2" in values["rfid_note"]
    assert values["samples"] == 1 and math.isfinite(values["psnr"])
    assert rec.image_metrics(image, image, fid=False)["rfid"] is None
    with pytest.raises(ValueError, match="do not match"):
        rec.image_metrics(_smooth_images(n=2), image)


# -----------------------------------------------------------------------------
# code_statistics
# -----------------------------------------------------------------------------

def test_vq_codes_using_four_entries():
    """Codes 0, 5, 9, 15 equally often out of 16: usage 1/4, perplexity 4, 4 bits per token."""
    codes = torch.tensor([0, 5, 9, 15]).repeat(6, 8)[:, :16]  # [6, 16], every code 24 times
    stats = rec.code_statistics("vq", codes, codebook_size=16, num_tokens=16, token_dim=12)
    assert stats["tokens_per_image"] == 16 and stats["bits_per_image"] == pytest.approx(16 * 4)
    assert stats["code_usage"] == pytest.approx(0.25) and stats["codes_used"] == 4
    assert stats["perplexity"] == pytest.approx(4.0)
    skewed = codes.clone()
    skewed[:, :8] = 0  # uneven use of the same four codes: fewer effective codes
    assert rec.code_statistics("softvq", skewed, 16, 16, 12)["perplexity"] < 4.0
    with pytest.raises(ValueError, match="outside"):
        rec.code_statistics("vq", codes, codebook_size=8, num_tokens=16, token_dim=12)


def test_binary_codes_with_one_constant_position():
    """Balanced random bits except one position stuck at 1: usage (K*D-1)/(K*D), entropy just under 1 bit."""
    k, d = 4, 3
    pattern = torch.tensor([[0], [1]]).bool().expand(2, k * d).reshape(2, k, d)
    codes = pattern.repeat(5, 1, 1)  # [10, K, D]: every position is 1 in exactly half the images
    codes[:, 2, 1] = True
    stats = rec.code_statistics("binary", codes, None, num_tokens=k, token_dim=d)
    assert stats["bits_per_image"] == k * d
    assert stats["code_usage"] == pytest.approx((k * d - 1) / (k * d))
    assert stats["bit_entropy"] == pytest.approx((k * d - 1) / (k * d))
    with pytest.raises(ValueError, match="binary codes must be"):
        rec.code_statistics("binary", codes, None, num_tokens=k, token_dim=d + 1)


def test_kl_has_no_bits():
    """Continuous latents: no bit count, no usage, K*D floats."""
    stats = rec.code_statistics("kl", None, None, num_tokens=32, token_dim=12)
    assert stats == {
        "tokens_per_image": 32, "bits_per_image": None, "code_usage": None, "latent_floats_per_image": 384
    }
    with pytest.raises(ValueError, match="non-empty codes"):
        rec.code_statistics("vq", None, 16, 32, 12)


# -----------------------------------------------------------------------------
# evaluate_reconstruction
# -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_shards(tmp_path_factory):
    """A tiny shapes shards folder (32x32 images), built once for the module."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    params = load_params(root / "params.yaml", profile="tiny", overrides=["tracking.enabled=false"], dataset="shapes")
    run_with_upstream(get_stage("shards"), params, "shapes", root)
    return root / "data" / "shapes" / "shards"


def test_evaluate_untrained_tokenizer(shapes_shards):
    """An untrained tokenizer gives finite PSNR/SSIM, rFID, vq statistics and a 2-row grid; no mode change."""
    torch.manual_seed(0)
    tokenizer = Tokenizer_T(image_size=32, num_tokens=16, codebook_size=64)
    metrics, picture = rec.evaluate_reconstruction(
        tokenizer, shapes_shards, split="train", batch_size=5, max_samples=12, grid=8
    )
    assert RESULT_KEYS | {"codes_used", "perplexity"} <= set(metrics)
    assert metrics["split"] == "train" and metrics["samples"] == 12
    assert math.isfinite(metrics["psnr"]) and 0 < metrics["psnr"] < 40
    assert -1 <= metrics["ssim"] < 1 and isinstance(metrics["rfid"], float) and metrics["rfid"] > 0
    assert metrics["tokens_per_image"] == 16 and metrics["bits_per_image"] == pytest.approx(16 * 6)
    assert 0 < metrics["code_usage"] <= 1 and 1 <= metrics["perplexity"] <= metrics["codes_used"]
    assert tokenizer.training  # put back as it was found
    assert picture.size == (8 * 33 + 1, 2 * 33 + 1) and picture.mode == "RGB"
    assert picture.getpixel((0, 0)) == rec.GUTTER and picture.getpixel((33, 40)) == rec.GUTTER


def test_evaluate_text_conditioned_binary_tokenizer(shapes_shards, monkeypatch):
    """text_for receives each batch's captions and its output reaches the tokenizer; binary statistics."""
    # rFID is covered above; skipping it here saves one 2048-d eigen-decomposition.
    monkeypatch.setattr(rec, "image_metrics", lambda a, b: IMAGE_METRICS(a, b, fid=False))
    seen: list[list[str]] = []

    def text_for(captions):
        seen.append(list(captions))
        return torch.randn(len(captions), 5, 8), torch.ones(len(captions), 5, dtype=torch.bool)

    tokenizer = Tokenizer_T(image_size=32, num_tokens=16, quantizer="binary", token_dim=6, text_dim=8)
    metrics, picture = rec.evaluate_reconstruction(
        tokenizer, shapes_shards, split="train", text_for=text_for, batch_size=4, max_samples=6, grid=3
    )
    assert [len(batch) for batch in seen] == [4, 2] and all(isinstance(c, str) for c in seen[0])
    assert metrics["bits_per_image"] == 16 * 6 and 0 <= metrics["bit_entropy"] <= 1
    assert picture.size == (3 * 33 + 1, 2 * 33 + 1)
    with pytest.raises(ValueError, match="text-conditioned"):
        rec.evaluate_reconstruction(tokenizer, shapes_shards, split="train", max_samples=2)


def test_empty_split_is_an_error(shapes_shards):
    """A split with no samples names the folder and the split."""
    with pytest.raises(ValueError, match=r"'test' split has no samples") as error:
        rec.evaluate_reconstruction(Tokenizer_T(image_size=32, num_tokens=16), shapes_shards, split="test")
    assert str(shapes_shards) in str(error.value)
