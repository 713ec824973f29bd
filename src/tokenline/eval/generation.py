"""FID and KID of generated images against a fixed real set, with the standard FID Inception offline.

A generation eval scores many sample sets (one per sampler, step count and guidance scale)
against the same real images, so `GenerationMetrics` keeps the real set's Inception statistics
and scores each generated set against them. Features come from torchmetrics' own Inception
module and input path (uint8 images, resized inside to 299 px), so the numbers are
torchmetrics' FID; the Fréchet distance itself is computed in the symmetric form

    FID = |mu_r - mu_g|^2 + tr(S_r) + tr(S_g) - 2 tr sqrt(S_r^1/2 S_g S_r^1/2)

with S_r^1/2 computed once (eigh), so each score costs one symmetric eigendecomposition
instead of torchmetrics' general eigvals of S_r S_g (about 10x slower at 2048-d on a CPU);
a test checks the two agree. KID is torchmetrics' polynomial-kernel MMD (`poly_mmd`) over
random subsets, mean and std.

With a few hundred images FID is biased upward against the usual 50k protocol: compare
numbers only between runs with the same reference set and sample count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokenline.eval.feature_cache import FeatureCache
from tokenline.eval.fid_inception import fid_weights_cache, inception_features

BATCH = 64  # images per Inception forward
FID_MIN_SAMPLES = 2  # a covariance needs two images
KID_SUBSETS = 100  # torchmetrics' default


def _to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 [0, 255], as torchmetrics' normalize=True path (clamped: samplers overshoot)."""
    return (((images.float() + 1.0) / 2.0).clamp(0.0, 1.0) * 255).byte()


def _check_images(images: Tensor, what: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} images must be [N, 3, H, W], got {list(images.shape)}")
    if len(images) < FID_MIN_SAMPLES:
        raise ValueError(f"FID needs at least {FID_MIN_SAMPLES} {what} images, got {len(images)}")


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """The symmetric square root of a positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


class GenerationMetrics:
    """FID and KID of generated sets against one real set, whose Inception statistics are computed once."""
    def __init__(self, real_images: Tensor, kid_subset_size: int = 1000, seed: int = 0, cache_dir: Path | None = None):
        """`real_images` [N, 3, H, W] in [-1, 1], N >= 2; KID subsets are drawn from `seed`; features kept in `cache_dir` if given."""
        _check_images(real_images, "real")
        self.real_count = len(real_images)
        self.kid_subset_size = min(kid_subset_size, self.real_count)
        self.seed = seed
        self._inception = inception_features(2048)
        self._cache = FeatureCache(cache_dir, fid_weights_cache().stem) if cache_dir is not None else None
        self._real = self.features(real_images)
        self._mu_real = self._real.mean(0)
        covariance = torch.cov(self._real.T)
        self._trace_real = covariance.trace()
        self._sqrt_real = _sqrt_psd(covariance)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """2048-d Inception pool features (float64) of images in [-1, 1]; images met before are read from the cache."""
        pixels = _to_uint8(images)
        if self._cache is None:
            return self._forward(pixels)
        keys = self._cache.keys(pixels)
        found = self._cache.load(keys)
        todo = [row for row, key in enumerate(keys) if key not in found]
        if todo:
            fresh = self._forward(pixels[todo])
            self._cache.store([keys[row] for row in todo], fresh)
            found |= {keys[row]: feature for row, feature in zip(todo, fresh)}
        return torch.stack([found[key] for key in keys])

    def _forward(self, pixels: Tensor) -> Tensor:
        """Inception features (float64) of uint8 images, in batches."""
        parts = [self._inception(pixels[start : start + BATCH]) for start in range(0, len(pixels), BATCH)]
        return torch.cat(parts).double()

    def frechet_distance(self, fake: Tensor) -> float:
        """FID between the real statistics and features `fake` [M, 2048]."""
        mu, covariance = fake.mean(0), torch.cov(fake.T)
        product = self._sqrt_real @ covariance @ self._sqrt_real
        trace_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp_min(0).sqrt().sum()
        return float((self._mu_real - mu).square().sum() + self._trace_real + covariance.trace() - 2 * trace_sqrt)

    def kernel_distance(self, fake: Tensor) -> tuple[float, float]:
        """KID (mean, std over subsets) between the real features and `fake` features."""
        from torchmetrics.image.kid import poly_mmd

        generator = torch.Generator().manual_seed(self.seed)
        values = []
        for _ in range(KID_SUBSETS):
            real_rows = torch.randperm(self.real_count, generator=generator)[: self.kid_subset_size]
            fake_rows = torch.randperm(len(fake), generator=generator)[: self.kid_subset_size]
            values.append(poly_mmd(self._real[real_rows], fake[fake_rows]))
        stacked = torch.stack(values)
        return float(stacked.mean()), float(stacked.std(unbiased=False))

    def score(self, fake_images: Tensor) -> dict[str, Any]:
        """{"fid", "kid", "kid_std", "samples"} of `fake_images` [M, 3, H, W] in [-1, 1]; KID is None when M < its subset size."""
        _check_images(fake_images, "generated")
        fake = self.features(fake_images)
        out: dict[str, Any] = {"fid": self.frechet_distance(fake), "kid": None, "kid_std": None, "samples": len(fake)}
        if len(fake) >= self.kid_subset_size:
            out["kid"], out["kid_std"] = self.kernel_distance(fake)
        return out

    def protocol(self) -> str:
        """How the numbers were made, for reports."""
        return (f"FID/KID: offline FID InceptionV3 (2048-d pool), {self.real_count} real images as the "
                f"reference; KID over {KID_SUBSETS} subsets of {self.kid_subset_size}")
