"""MaskGIT's parallel iterative decoding: all K codes start masked and are revealed in `steps` rounds.

Each round samples a code for every masked position (softmax at `temperature`), keeps the most
confident ones, and re-masks the rest, so that after round s a cos(pi/2 * (s + 1) / steps) share
is still masked and none after the last round. Gumbel noise on the confidences, annealed to zero
over the rounds (MaskGIT's "choice temperature"), keeps early rounds from always keeping the same
easy tokens. Guidance is the caller's: `logits_fn` may already mix conditional and unconditional
logits (see `guided_logits`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from tokenline.generator.objectives import cosine_mask_ratio

LogitsFn = Callable[[Tensor], Tensor]


def guided_logits(cond_fn: LogitsFn, uncond_fn: LogitsFn, scale: float) -> LogitsFn:
    """Classifier-free guidance on logits: l_u + scale * (l_c - l_u); scale 1 evaluates only cond."""
    if scale == 1.0:
        return cond_fn

    def logits(codes: Tensor) -> Tensor:
        conditional = cond_fn(codes).float()
        unconditional = uncond_fn(codes).float()
        return unconditional + scale * (conditional - unconditional)

    return logits


def masked_counts(length: int, steps: int) -> list[int]:
    """Positions still masked after each round: cosine-decreasing, at least one fewer per round, 0 at the end."""
    counts, previous = [], length
    for step in range(steps):
        remaining = math.floor(length * float(cosine_mask_ratio(torch.tensor((step + 1) / steps))))
        # Reveal at least one token per round, so `steps` rounds always finish (when steps <= length).
        remaining = max(0, min(remaining, previous - 1))
        counts.append(remaining)
        previous = remaining
    counts[-1] = 0
    return counts


@torch.no_grad()
def decode_masked(
    logits_fn: LogitsFn,
    batch: int,
    length: int,
    mask_id: int,
    steps: int = 8,
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    generator: torch.Generator | None = None,
    device=None,
) -> Tensor:
    """Codes [batch, length] decoded from all-masked in `steps` rounds of `logits_fn(codes) -> [B, L, V]`."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    codes = torch.full((batch, length), mask_id, dtype=torch.long, device=device)
    for step, remaining in enumerate(masked_counts(length, steps)):
        masked = codes == mask_id
        logits = logits_fn(codes).float()
        probabilities = torch.softmax(logits / temperature, dim=-1)
        flat = probabilities.reshape(-1, probabilities.shape[-1])
        sampled = torch.multinomial(flat, 1, generator=generator).reshape(batch, length)
        sampled = torch.where(masked, sampled, codes)
        confidence = torch.gather(probabilities, -1, sampled[..., None])[..., 0].clamp_min(1e-20).log()
        anneal = choice_temperature * (1.0 - (step + 1) / steps)
        if anneal > 0:
            uniform = torch.rand(confidence.shape, generator=generator, device=confidence.device)
            confidence = confidence + anneal * -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        # Revealed positions stay revealed: they are never among the least confident.
        confidence = torch.where(masked, confidence, torch.inf)
        codes = sampled
        if remaining > 0:
            lowest = confidence.argsort(dim=1)[:, :remaining]
            codes = codes.scatter(1, lowest, mask_id)
    return codes
