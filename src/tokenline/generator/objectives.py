"""Training objectives: rectified flow for continuous latents, masked-token prediction for codes.

Flow convention (diffusers' FlowMatchEulerDiscreteScheduler): x_t = (1 - t) x0 + t noise, t = 1 is
noise, and the model predicts v = noise - x0. Timesteps are logit-normal (SD3): t = sigmoid(n),
n ~ N(mean, std), which spends the training signal on the middle of the path where it is hardest.

The swap term (opt-in) contrasts a caption with its swap, the same words in the opposite layout
("a red circle above a blue square" / "a blue square above a red circle"): at the same x_t, the
flow loss under the swap must exceed the loss under the true caption. Plain flow matching barely
separates the two where layout is decided (t > 0.85; benchmarks/shapes_binding.py), so the
generator reads a caption as a bag of words.

Masked convention (MaskGIT): a cosine schedule picks how many of the K codes are corrupted; the
model predicts the originals at those positions. VQ-Diffusion's mask-and-replace corrupts a
fraction of them to random codes instead of [MASK], so the model also learns to correct tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenline.generator.model import FlowTransformer, MaskedTransformer, TextBatch


def logit_normal_times(batch: int, mean: float = 0.0, std: float = 1.0, device=None, generator=None) -> Tensor:
    """t = sigmoid(N(mean, std)) for each of `batch` samples, float32 in (0, 1)."""
    normal = torch.randn(batch, device=device, generator=generator)
    return torch.sigmoid(mean + std * normal)


def noised_latents(x0: Tensor, time_mean: float = 0.0, time_std: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t, velocity target noise - x0) at logit-normal t for a batch of clean latents."""
    t = logit_normal_times(len(x0), time_mean, time_std, device=x0.device)
    noise = torch.randn_like(x0)
    return (1 - t[:, None, None]) * x0 + t[:, None, None] * noise, t, noise - x0


def flow_matching_loss(
    model: FlowTransformer, x0: Tensor, text: TextBatch | None, drop: Tensor | None = None,
    time_mean: float = 0.0, time_std: float = 1.0,
) -> Tensor:
    """Mean squared error between the predicted and the true velocity (noise - x0) at logit-normal t."""
    x_t, t, target = noised_latents(x0, time_mean, time_std)
    return F.mse_loss(model(x_t, t, text, drop).float(), target.float())


@dataclass(frozen=True)
class SwapTerm:
    """Settings of the swap term: weight * softplus(-(loss_swapped - loss_true) / temperature) at t >= min_t."""

    weight: float
    temperature: float = 0.02
    min_t: float = 0.5


def flow_matching_swap_loss(
    model: FlowTransformer, x0: Tensor, text: TextBatch, drop: Tensor, swapped: TextBatch, has_swap: Tensor,
    term: SwapTerm, time_mean: float = 0.0, time_std: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(loss, flow loss, mean swap gap or None): flow matching plus the swap term, in one forward pass.

    `swapped` holds, row for row, the swapped caption of each row where `has_swap` is True (other
    rows are ignored). Rows dropped to the null caption or noised below `term.min_t` (where x_t
    still shows the layout, so no caption needs reading) take no part in the term.
    """
    x_t, t, target = noised_latents(x0, time_mean, time_std)
    used = has_swap & ~drop & (t >= term.min_t)
    extra = int(used.sum())
    velocity = model(torch.cat([x_t, x_t[used]]), torch.cat([t, t[used]]), text.concat(swapped.select(used)),
                     torch.cat([drop, torch.zeros(extra, dtype=torch.bool, device=drop.device)]))
    errors = (velocity.float() - torch.cat([target, target[used]]).float()).pow(2).mean(dim=(1, 2))
    own = errors[: len(x0)]
    flow = own.mean()
    if extra == 0:
        return flow, flow.detach(), None
    gap = errors[len(x0):] - own[used]
    loss = flow + term.weight * F.softplus(-gap / term.temperature).mean()
    return loss, flow.detach(), gap.mean().detach()


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
