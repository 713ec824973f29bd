"""The sampler loops of the exported pipeline in numpy: the graphs evaluate, these loops decide.

As optimum keeps a diffusers scheduler outside the ONNX graph, the loop lives here and calls a
backend (onnxruntime, or the same torch modules for parity) once per step. Every image draws its
randomness from its own stream, numpy's PCG64 seeded with (seed, image index), so an image does
not depend on the batch it was generated in: `--n 4` and `--n 8` share their first four images,
and batch 1 and batch 7 give the same pictures (which is how parity across batch sizes is read).

Conventions match `tokenline.generator`: flow time runs from t = 1 (noise) to t = 0 (data) on a
uniform grid, x <- x + (t_next - t) v (Euler) or Heun's trapezoid with a final Euler step;
masked decoding reveals codes over cosine-scheduled rounds with Gumbel-annealed confidences
(`tokenline.generator.masked_decoding`). Torch's random streams are not numpy's, so an image here
is not the image `generate_images` draws for the same seed; the two follow the same distribution.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

FLOW_SAMPLERS = ("euler", "heun", "consistency")
CHOICE_TEMPERATURE = 4.5  # MaskGIT's annealed Gumbel scale on the confidences (as masked_decoding)

VelocityFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (x [B, K, D], t [B]) -> v
LogitsFn = Callable[[np.ndarray], np.ndarray]                # codes [B, K] int64 -> logits [B, K, V]


def image_streams(seed: int, first: int, count: int) -> list[np.random.Generator]:
    """One random stream per image, keyed by (seed, absolute image index)."""
    return [np.random.default_rng([seed, first + i]) for i in range(count)]


def initial_noise(streams: list[np.random.Generator], tokens: int, width: int) -> np.ndarray:
    """Standard normal noise [B, tokens, width] float32, one image per stream."""
    return np.stack([rng.standard_normal((tokens, width), dtype=np.float32) for rng in streams])


def time_grid(steps: int) -> np.ndarray:
    """`steps + 1` float32 times from 1 to 0 (float64 first, so the endpoints are exact)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return np.linspace(1.0, 0.0, steps + 1, dtype=np.float64).astype(np.float32)


def sample_flow(velocity: VelocityFn, noise: np.ndarray, steps: int, sampler: str = "euler",
                streams: list[np.random.Generator] | None = None) -> np.ndarray:
    """Integrate dx/dt = v from noise at t = 1 to t = 0; returns x [B, K, D] float32.

    `consistency` (a distilled student's sampler) reads x0 = x - t v at each grid time and re-noises
    it to the next with fresh noise from each image's stream.
    """
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"the exported pipeline samples with {', '.join(FLOW_SAMPLERS)}, not {sampler!r}")
    grid = time_grid(steps)
    x = noise.astype(np.float32)
    batch = x.shape[0]
    for i in range(steps):
        t, t_next = grid[i], grid[i + 1]
        slope = velocity(x, np.full(batch, t, dtype=np.float32))
        if sampler == "consistency":
            x = x - t * slope
            if i < steps - 1:
                if streams is None:
                    raise ValueError("multistep consistency sampling draws fresh noise: pass the images' streams")
                fresh = initial_noise(streams, x.shape[1], x.shape[2])
                x = ((1 - t_next) * x + t_next * fresh).astype(np.float32)
            continue
        predicted = x + (t_next - t) * slope
        if sampler == "euler" or i == steps - 1:  # Heun's last step is plain Euler: v is never read at t = 0
            x = predicted
        else:
            corrected = velocity(predicted, np.full(batch, t_next, dtype=np.float32))
            x = x + (t_next - t) * 0.5 * (slope + corrected)
    return x


def masked_counts(length: int, steps: int) -> list[int]:
    """Positions still masked after each round: cosine-decreasing, at least one fewer per round, 0 at the end."""
    counts, previous = [], length
    for step in range(steps):
        remaining = math.floor(length * math.cos(math.pi / 2 * (step + 1) / steps))
        remaining = max(0, min(remaining, previous - 1))
        counts.append(remaining)
        previous = remaining
    counts[-1] = 0
    return counts


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64 for stable cumulative sums."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=-1, keepdims=True)


def decode_masked(logits_fn: LogitsFn, streams: list[np.random.Generator], length: int, mask_id: int,
                  steps: int, temperature: float = 1.0) -> np.ndarray:
    """Codes [B, length] int64 from all-masked in `steps` rounds (MaskGIT's parallel decoding)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = len(streams)
    codes = np.full((batch, length), mask_id, dtype=np.int64)
    for step, remaining in enumerate(masked_counts(length, steps)):
        masked = codes == mask_id
        probabilities = softmax(logits_fn(codes) / temperature)
        draws = np.stack([rng.random((2, length)) for rng in streams])  # [B, 2, K]: code draw, Gumbel draw
        cumulative = np.cumsum(probabilities, axis=-1)
        sampled = (cumulative < draws[:, 0, :, None] * cumulative[..., -1:]).sum(axis=-1)
        sampled = np.minimum(sampled, probabilities.shape[-1] - 1)
        sampled = np.where(masked, sampled, codes)
        chosen = np.take_along_axis(probabilities, sampled[..., None], axis=-1)[..., 0]
        confidence = np.log(np.maximum(chosen, 1e-20))
        anneal = CHOICE_TEMPERATURE * (1.0 - (step + 1) / steps)
        if anneal > 0:
            uniform = np.clip(draws[:, 1], 1e-20, 1.0 - 1e-7)
            confidence = confidence + anneal * -np.log(-np.log(uniform))
        confidence = np.where(masked, confidence, np.inf)  # revealed codes stay revealed
        codes = sampled.astype(np.int64)
        if remaining > 0:
            lowest = np.argsort(confidence, axis=1, kind="stable")[:, :remaining]
            np.put_along_axis(codes, lowest, mask_id, axis=1)
    return codes
