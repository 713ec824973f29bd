"""The students' losses: reflow (2-rectified flow, then distillation at t = 1), consistency distillation, mask_distill.

Flow convention as everywhere in tokenline: x_t = (1 - t) x0 + t noise, the model predicts
v = noise - x0, and the denoised guess at (x, t) is x0_hat = x - t v.

References:
- Liu, Gong & Liu 2023, "Flow straight and fast" (reflow, k-step distillation at t = 1).
- Lee, Lin & Fanti 2024, "Improving the training of rectified flows" (rfpp: U-shaped timesteps,
  pseudo-Huber loss, initialisation from the teacher).
- Song & Dhariwal 2024, "Improved techniques for training consistency models" (iCT: pseudo-Huber
  with c = 0.00054 sqrt(d), lognormal noise levels, the doubling curriculum, no EMA target).
- Chang et al. 2022, "MaskGIT" (the decoding schedule mask_distill trains the student's rounds on).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenline.generator.masked_decoding import masked_counts
from tokenline.generator.model import FlowTransformer, MaskedTransformer, TextBatch
from tokenline.generator.samplers import VelocityFn


def huber_scale(scale: float, model: FlowTransformer | MaskedTransformer) -> float:
    """The pseudo-Huber c for a model's samples: scale * sqrt(d), d = tokens * width (iCT's 0.00054 sqrt(d))."""
    return scale * math.sqrt(model.config.num_tokens * model.config.token_dim)


def pseudo_huber(prediction: Tensor, target: Tensor, c: float) -> Tensor:
    """Per-sample sqrt(|prediction - target|^2 + c^2) - c, the norm over every non-batch element: [B]."""
    squared = (prediction.float() - target.float()).flatten(1).pow(2).sum(1)
    return torch.sqrt(squared + c * c) - c


def u_shaped_times(batch: int, a: float, generator: torch.Generator | None = None) -> Tensor:
    """t in [0, 1] with density ∝ e^{a t} + e^{a (1 - t)} (rfpp's U shape, a = 4); a = 0 is uniform."""
    u = torch.rand(batch, generator=generator)
    if a == 0:
        return u
    t = torch.log1p(u * math.expm1(a)) / a  # inverse CDF of the density ∝ e^{a t} on [0, 1]
    mirrored = torch.rand(batch, generator=generator) < 0.5
    return torch.where(mirrored, 1 - t, t)


def reflow_loss(model: FlowTransformer, x0: Tensor, noise: Tensor, text: TextBatch, t: Tensor, c: float,
                drop: Tensor | None = None) -> Tensor:
    """2-rectified flow: pseudo-Huber between v(x_t, t) and the straight pair's velocity noise - x0."""
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    return pseudo_huber(model(x_t, t, text, drop), noise - x0, c).mean()


def reflow_distill_loss(model: FlowTransformer, x0: Tensor, noise: Tensor, text: TextBatch, c: float,
                        drop: Tensor | None = None) -> Tensor:
    """One-step distillation at t = 1 only (RectifiedFlow's `t0` schedule): x0_hat = noise - v(noise, 1) against x0."""
    ones = torch.ones(len(noise))
    return pseudo_huber(noise - model(noise, ones, text, drop), x0, c).mean()


# --------------------------------------------------------------------------------------
# consistency distillation
# --------------------------------------------------------------------------------------


def karras_sigmas(count: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """`count` EDM noise levels from sigma_min up to sigma_max (Karras et al. 2022's rho schedule), float64."""
    i = torch.arange(count, dtype=torch.float64) / max(count - 1, 1)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (low + i * (high - low)) ** rho


def sigma_to_time(sigma: Tensor) -> Tensor:
    """The flow time whose x_t is x0 + sigma noise up to scale: t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


def curriculum_levels(step: int, total_steps: int, s0: int, s1: int) -> int:
    """iCT's discretization curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1))."""
    stages = math.floor(math.log2(max(s1 // s0, 1))) + 1
    per_stage = max(total_steps // stages, 1)
    return min(s0 * 2 ** (step // per_stage), s1) + 1


def lognormal_level_probabilities(sigmas: Tensor, p_mean: float, p_std: float) -> Tensor:
    """P(i) for the pair (sigma_i, sigma_{i+1}): the lognormal(p_mean, p_std) mass between them, normalised."""
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    mass = (cdf[1:] - cdf[:-1]).clamp_min(0)
    return mass / mass.sum()


def consistency_function(model: FlowTransformer, x: Tensor, t: Tensor, text: TextBatch | None,
                         drop: Tensor | None = None) -> Tensor:
    """f(x, t) = x - t v(x, t): the denoised guess, exactly the identity at t = 0 (the boundary condition)."""
    return x - t[:, None, None] * model(x, t, text, drop)


def consistency_distillation_loss(model: FlowTransformer, teacher_velocity: VelocityFn, x0: Tensor, text: TextBatch,
                                  sigmas: Tensor, probabilities: Tensor, c: float, drop: Tensor | None = None,
                                  generator: torch.Generator | None = None) -> Tensor:
    """iCT's weighted pseudo-Huber between f(x_{t+}, t+) and the stop-gradient f(x_{t-}, t-), x_{t-} one teacher Euler step below.

    The target uses the current weights (no EMA teacher, as iCT); the weight is 1 / (sigma_{i+1} - sigma_i).
    """
    batch = len(x0)
    level = torch.multinomial(probabilities.float(), batch, replacement=True, generator=generator)
    low, high = sigmas[level], sigmas[level + 1]
    t_low, t_high = sigma_to_time(low).float(), sigma_to_time(high).float()
    noise = torch.randn(x0.shape, generator=generator)
    x_high = (1 - t_high[:, None, None]) * x0 + t_high[:, None, None] * noise
    with torch.no_grad():
        x_low = x_high + (t_low - t_high)[:, None, None] * teacher_velocity(x_high, t_high)
        target = consistency_function(model, x_low, t_low, text, drop)
    weight = (1.0 / (high - low)).float()
    return (weight * pseudo_huber(consistency_function(model, x_high, t_high, text, drop), target, c)).mean()


# --------------------------------------------------------------------------------------
# mask_distill
# --------------------------------------------------------------------------------------


def round_mask_counts(length: int, rounds: int) -> list[int]:
    """Masked positions at the input of each of `rounds` decoding rounds: all of them, then MaskGIT's schedule."""
    return [length, *masked_counts(length, rounds)[:-1]]


def mask_distill_loss(model: MaskedTransformer, codes: Tensor, text: TextBatch, rounds: int,
                      drop: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Cross-entropy of the teacher's decoded codes at masked positions, masked as the student's `rounds` rounds see them.

    Each row takes one of the rounds' masked counts at random (uniformly) and hides that many
    random positions; the student learns the teacher's (guided, many-round) choices from the
    states its own few-round decoding starts each round in.
    """
    batch, length = codes.shape
    counts = torch.tensor(round_mask_counts(length, rounds))
    count = counts[torch.randint(len(counts), (batch,), generator=generator)]
    ranks = torch.rand(batch, length, generator=generator).argsort(dim=1).argsort(dim=1)
    masked = ranks < count[:, None]
    logits = model(codes.masked_fill(masked, model.mask_id), text, drop).float()
    return F.cross_entropy(logits[masked], codes[masked])
