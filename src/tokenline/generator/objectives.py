"""Training objectives: rectified flow for continuous latents, masked-token prediction for codes.

Flow convention (diffusers' FlowMatchEulerDiscreteScheduler): x_t = (1 - t) x0 + t noise, t = 1 is
noise, and the model predicts v = noise - x0. Timesteps are logit-normal (SD3): t = sigmoid(n),
n ~ N(mean, std), which spends the training signal on the middle of the path where it is hardest.

Masked convention (MaskGIT): a cosine schedule picks how many of the K codes are corrupted; the
model predicts the originals at those positions. VQ-Diffusion's mask-and-replace corrupts a
fraction of them to random codes instead of [MASK], so the model also learns to correct tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenline.generator.model import FlowTransformer, MaskedTransformer, TextBatch


def logit_normal_times(batch: int, mean: float = 0.0, std: float = 1.0, device=None, generator=None) -> Tensor:
    """t = sigmoid(N(mean, std)) for each of `batch` samples, float32 in (0, 1)."""
    normal = torch.randn(batch, device=device, generator=generator)
    return torch.sigmoid(mean + std * normal)


def flow_matching_loss(
    model: FlowTransformer, x0: Tensor, text: TextBatch | None, drop: Tensor | None = None,
    time_mean: float = 0.0, time_std: float = 1.0,
) -> Tensor:
    """Mean squared error between the predicted and the true velocity (noise - x0) at logit-normal t."""
    t = logit_normal_times(len(x0), time_mean, time_std, device=x0.device)
    noise = torch.randn_like(x0)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    return F.mse_loss(model(x_t, t, text, drop).float(), (noise - x0).float())


def cosine_mask_ratio(progress: Tensor) -> Tensor:
    """MaskGIT's schedule: the share of masked tokens at progress u in [0, 1] is cos(pi/2 * u)."""
    return torch.cos(math.pi / 2 * progress)


def corrupt_codes(codes: Tensor, mask_id: int, vocab: int, replace_prob: float = 0.0) -> tuple[Tensor, Tensor]:
    """Corrupt a cosine-scheduled share of each row: (inputs, corrupted [B, K] bool).

    At least one position per row is corrupted, so every row trains. Of the corrupted positions,
    `replace_prob` get a uniformly random code (VQ-Diffusion's replace) and the rest [MASK].
    """
    batch, length = codes.shape
    ratio = cosine_mask_ratio(torch.rand(batch, device=codes.device))
    count = (ratio * length).ceil().clamp(1, length)
    # The `count` positions with the lowest random scores are the corrupted ones.
    ranks = torch.rand(batch, length, device=codes.device).argsort(dim=1).argsort(dim=1)
    corrupted = ranks < count[:, None]
    inputs = codes.masked_fill(corrupted, mask_id)
    if replace_prob > 0:
        replaced = corrupted & (torch.rand(batch, length, device=codes.device) < replace_prob)
        random_codes = torch.randint(0, vocab, codes.shape, device=codes.device)
        inputs = torch.where(replaced, random_codes, inputs)
    return inputs, corrupted


def masked_token_loss(
    model: MaskedTransformer, codes: Tensor, text: TextBatch | None, drop: Tensor | None = None,
    replace_prob: float = 0.0,
) -> Tensor:
    """Cross-entropy of the original codes at the corrupted positions."""
    inputs, corrupted = corrupt_codes(codes, model.mask_id, model.config.codebook_size, replace_prob)
    logits = model(inputs, text, drop).float()
    return F.cross_entropy(logits[corrupted], codes[corrupted])
