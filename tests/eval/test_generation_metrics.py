"""FID/KID of generated sets against one real set: zero for the real set itself, growing with damage."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tokenline.data.shapes import ShapesSource
from tokenline.eval.generation import GenerationMetrics

pytestmark = pytest.mark.integration  # Inception features of hundreds of images per test


def shapes_images(count: int, seed: int) -> torch.Tensor:
    """`count` rendered shapes scenes at 32 px as [-1, 1] floats."""
    source = ShapesSource(resolution=32, size=count, seed=seed)
    arrays = [np.asarray(Image.open(io.BytesIO(source.record(i).image)).convert("RGB")) for i in range(count)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def metrics():
    return GenerationMetrics(shapes_images(24, seed=0), kid_subset_size=16)


def test_the_real_set_scores_zero_and_damage_scores_worse(metrics):
    real = shapes_images(24, seed=0)
    same = metrics.score(real)
    other_scenes = metrics.score(shapes_images(24, seed=1))
    generator = torch.Generator().manual_seed(0)
    noise = metrics.score(torch.rand(24, 3, 32, 32, generator=generator) * 2 - 1)
    assert abs(same["fid"]) < 1e-2
    # KID's unbiased MMD assumes independent sets; the real set against itself shares images
    # between subsets, which pulls it slightly below 0 (measured -0.013), far from noise's 0.63.
    assert abs(same["kid"]) < 0.05
    # Same distribution, other draws < pure noise, for both metrics.
    assert same["fid"] < other_scenes["fid"] < noise["fid"]
    assert other_scenes["kid"] < noise["kid"]
    assert noise["samples"] == 24 and noise["kid_std"] >= 0


def test_scores_do_not_leak_between_sets(metrics):
    # The real features stay; the generated ones are cleared between calls.
    noise = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    first = metrics.score(noise)
    metrics.score(shapes_images(24, seed=0))
    assert metrics.score(noise)["fid"] == pytest.approx(first["fid"], rel=1e-6)


def test_fid_and_kid_equal_torchmetrics(metrics):
    from tokenline.eval.fid_inception import frechet_inception_distance, kernel_inception_distance

    real = shapes_images(24, seed=0)
    fake = shapes_images(24, seed=1)
    fid = frechet_inception_distance(feature=2048, normalize=True)
    kid = kernel_inception_distance(subset_size=16, normalize=True)
    for metric in (fid, kid):
        metric.update((real + 1) / 2, real=True)
        metric.update((fake + 1) / 2, real=False)
    ours = metrics.score(fake)
    assert ours["fid"] == pytest.approx(float(fid.compute()), rel=1e-3)
    # KID draws its own random subsets: equal in expectation, so within a few of its stds.
    kid_mean, kid_std = (float(v) for v in kid.compute())
    assert abs(ours["kid"] - kid_mean) < 3 * max(kid_std, ours["kid_std"]) + 1e-4


def test_small_sets_skip_kid_and_bad_shapes_are_named(metrics):
    few = metrics.score(shapes_images(8, seed=2))
    assert few["kid"] is None and few["fid"] > 0
    with pytest.raises(ValueError, match=r"generated images must be \[N, 3, H, W\]"):
        metrics.score(torch.zeros(4, 1, 32, 32))
    with pytest.raises(ValueError, match="at least 2 real images"):
        GenerationMetrics(torch.zeros(1, 3, 32, 32))
    assert "24 real images" in metrics.protocol()


def test_cached_features_equal_computed_ones_and_only_new_images_run_inception(metrics, tmp_path, monkeypatch):
    images = shapes_images(6, seed=2)
    cached = GenerationMetrics(shapes_images(4, seed=0), cache_dir=tmp_path)
    first = cached.features(images)
    assert torch.allclose(first, metrics.features(images), atol=1e-4)

    # A fresh process's metrics on the same folder: the 6 known images come from disk, one changed image runs.
    again = GenerationMetrics(shapes_images(4, seed=0), cache_dir=tmp_path)
    forwarded: list[int] = []
    real_forward = again._forward
    monkeypatch.setattr(again, "_forward", lambda pixels: forwarded.append(len(pixels)) or real_forward(pixels))
    assert torch.equal(again.features(images), first)
    assert forwarded == []
    changed = images.clone()
    changed[3] = -changed[3]  # the negative of a scene
    features = again.features(changed)
    assert forwarded == [1]
    assert torch.equal(features[[0, 1, 2, 4, 5]], first[[0, 1, 2, 4, 5]])
    assert not torch.allclose(features[3], first[3])
