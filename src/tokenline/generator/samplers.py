"""Samplers for rectified-flow generators: ODE (Euler, Heun), SDE (Euler-Maruyama), time-shifted Euler, consistency.

Convention (rectified flow, the same as diffusers' ``FlowMatchEulerDiscreteScheduler``): time ``t``
runs over [0, 1], ``t = 1`` is pure noise and ``t = 0`` is data,

    x_t = (1 - t) * x0 + t * noise,        v = noise - x0 = dx/dt,

and the model predicts the velocity ``v``. Sampling integrates from ``t = 1`` down to ``t = 0``.
From a velocity at ``(x, t)`` one reads the denoised sample, the noise and the score:

    x0_hat = x - t * v,    noise_hat = x + (1 - t) * v,    score = -noise_hat / t.

A ``VelocityFn`` takes ``x`` [B, ...] and ``t`` [B] and returns ``v`` shaped like ``x``. The samplers
keep their state in float32 (or wider, when the noise is wider), as diffusers' schedulers upcast
inside ``step``; the model sees ``x`` in the noise's dtype and ``t`` in float32, and the result
comes back in the noise's dtype. ``SampleResult.nfe`` counts velocity calls made by the sampler.

References:
- Liu, Gong & Liu 2023, "Flow straight and fast" (rectified flow); Lipman et al. 2023, "Flow matching".
- Esser et al. 2024, "Scaling rectified flow transformers" (SD3 time shift of the schedule).
- Karras et al. 2022, "Elucidating the design space of diffusion-based generative models" (Heun,
  with a plain Euler step into t = 0).
- Song et al. 2021, "Score-based generative modeling through stochastic differential equations"
  (reverse-time SDE, predictor-corrector with a Langevin corrector and its signal-to-noise ratio).
- Ma et al. 2024, "SiT: exploring flow and diffusion-based generative models with scalable
  interpolant transformers" (SDE sampling of an interpolant with a free diffusion coefficient).
- Li et al. 2024, "Alleviating exposure bias in diffusion models through sampling with shifted
  time steps" (TS-DPM, the time-shift sampler).
- Ho & Salimans 2022, "Classifier-free diffusion guidance"; Kynkäänniemi et al. 2024, "Applying
  guidance in a limited interval improves sample and distribution quality in diffusion models".
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

__all__ = [
    "SAMPLERS",
    "ConsistencySampler",
    "CountingVelocity",
    "EulerMaruyamaSampler",
    "EulerSampler",
    "HeunSampler",
    "SampleResult",
    "Sampler",
    "TimeShiftSampler",
    "VelocityFn",
    "build_sampler",
    "guided_velocity",
    "time_grid",
]

VelocityFn = Callable[[Tensor, Tensor], Tensor]

# A velocity already bound to the sampler's dtypes: (state x, time t as a 0-dim or [B] tensor) -> v.
_Model = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SampleResult:
    """The sample at t = 0 (in the noise's dtype) and the number of velocity evaluations."""

    x: Tensor
    nfe: int


class CountingVelocity:
    """A velocity function that counts its calls in `.calls` (one call = one evaluation)."""

    def __init__(self, fn: VelocityFn) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(x, t)


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def _check_positive(name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> Tensor:
    """`steps + 1` float32 times from 1 to 0; shift s > 1 maps t to s t / (1 + (s - 1) t) (SD3)."""
    steps = _check_steps(steps)
    shift = _check_positive("shift", shift)
    # float64 first, so the endpoints are exactly 1 and 0 and the shift adds no float32 rounding.
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift != 1.0:
        t = shift * t / (1.0 + (shift - 1.0) * t)
    return t.to(device=device, dtype=torch.float32)


def _per_sample(value: Tensor, x: Tensor) -> Tensor:
    """A scalar or a [B] tensor, shaped to broadcast against x [B, ...]."""
    if value.dim() == 0:
        return value
    return value.reshape(-1, *([1] * (x.dim() - 1)))


def _mean_norm(x: Tensor) -> Tensor:
    """The L2 norm of each sample over its non-batch elements, averaged over the batch (0-dim)."""
    return x.reshape(x.shape[0], -1).norm(dim=1).mean()


def _bind(velocity: VelocityFn, model_dtype: torch.dtype, work_dtype: torch.dtype) -> _Model:
    """The velocity seen by a sampler: x cast to the model's dtype, t as float32 [B], v upcast."""

    def model(x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        # A fresh [B] tensor (not an expanded view), so a model may modify it in place.
        times = t.reshape(1).repeat(batch) if t.dim() == 0 else t
        return velocity(x.to(model_dtype), times.to(torch.float32)).to(work_dtype)

    return model


class Sampler(ABC):
    """Integrates a velocity field from noise at t = 1 to a sample at t = 0 on `time_grid(steps, shift)`."""

    name: str = ""

    def __init__(self, shift: float = 1.0) -> None:
        self.shift = _check_positive("shift", shift)

    def sample(
        self, velocity: VelocityFn, noise: Tensor, steps: int, generator: torch.Generator | None = None,
    ) -> SampleResult:
        """Sample from `noise` [B, ...] in `steps` steps; `generator` feeds any randomness."""
        grid = time_grid(steps, self.shift, device=noise.device)
        counted = CountingVelocity(velocity)
        work_dtype = torch.promote_types(noise.dtype, torch.float32)
        model = _bind(counted, noise.dtype, work_dtype)
        x = self._integrate(model, noise.to(work_dtype), grid, generator)
        return SampleResult(x=x.to(noise.dtype), nfe=counted.calls)

    @abstractmethod
    def _integrate(self, model: _Model, x: Tensor, grid: Tensor, generator: torch.Generator | None) -> Tensor:
        """x at t = grid[0] = 1 -> x at t = grid[-1] = 0."""

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


class EulerSampler(Sampler):
    """First-order Euler on the ODE dx/dt = v: one evaluation per step (diffusers' flow-match Euler)."""

    name = "euler"

    def _integrate(self, model: _Model, x: Tensor, grid: Tensor, generator: torch.Generator | None) -> Tensor:
        for t, t_next in pairwise(grid):
            x = x + (t_next - t) * model(x, t)
        return x


class HeunSampler(Sampler):
    """Second-order Heun (trapezoidal predictor-corrector); the last step into t = 0 is plain Euler.

    As in Karras et al. (2022), the final step skips the correction, so that the velocity is never
    evaluated at t = 0: `steps` steps cost 2 * steps - 1 evaluations.
    """

    name = "heun"

    def _integrate(self, model: _Model, x: Tensor, grid: Tensor, generator: torch.Generator | None) -> Tensor:
        last = len(grid) - 2
        for i, (t, t_next) in enumerate(pairwise(grid)):
            dt = t_next - t
            slope = model(x, t)
            predicted = x + dt * slope
            if i == last:
                x = predicted
            else:
                x = x + dt * 0.5 * (slope + model(predicted, t_next))
        return x


class EulerMaruyamaSampler(Sampler):
    """Euler-Maruyama on the reverse SDE with the ODE's marginals, g(t)^2 = 2 noise_scale t.

    The reverse-time SDE dx = [v - g^2/2 * score] dt + g dW keeps the marginals of the flow for any
    diffusion g (Song et al. 2021); with g^2 = 2 noise_scale t and score = -noise_hat / t its drift
    is v + noise_scale * noise_hat, free of any division by t. The last step into t = 0 is
    deterministic (a plain Euler step, which lands on x0_hat). With `corrector_steps` > 0, each
    predictor step into t > 0 is followed by that many Langevin steps at the new time
    (predictor-corrector), each costing one evaluation. As in Song et al., the Langevin step size is
    2 * (snr * |z| / |score|)^2 with per-sample norms averaged over the batch: a step size read
    from each sample's own score norm would depend on that sample, which biases the chain (its
    variance grows by about 1/D for samples of D elements); the price is that samples of a batch
    share one step size. Evaluations: steps + corrector_steps * (steps - 1).
    """

    name = "euler_maruyama"

    def __init__(
        self, noise_scale: float = 1.0, corrector_steps: int = 0, snr: float = 0.16, shift: float = 1.0,
    ) -> None:
        super().__init__(shift)
        if not (math.isfinite(noise_scale) and noise_scale >= 0):
            raise ValueError(f"noise_scale must be a finite number >= 0, got {noise_scale!r}")
        if isinstance(corrector_steps, bool) or int(corrector_steps) != corrector_steps or corrector_steps < 0:
            raise ValueError(f"corrector_steps must be an integer >= 0, got {corrector_steps!r}")
        self.noise_scale = float(noise_scale)
        self.corrector_steps = int(corrector_steps)
        self.snr = _check_positive("snr", snr)

    def _integrate(self, model: _Model, x: Tensor, grid: Tensor, generator: torch.Generator | None) -> Tensor:
        last = len(grid) - 2
        for i, (t, t_next) in enumerate(pairwise(grid)):
            v = model(x, t)
            if i == last:
                x = x + (t_next - t) * v
                break
            x = self._predict(x, v, t, t_next, generator)
            for _ in range(self.corrector_steps):
                x = self._correct(model, x, t_next, generator)
        return x

    def _predict(self, x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, generator: torch.Generator | None) -> Tensor:
        """One Euler-Maruyama step of the reverse SDE from t down to t_next > 0."""
        h = t - t_next
        if self.noise_scale == 0.0:
            return x - h * v
        noise_hat = x + (1 - t) * v
        drift = v + self.noise_scale * noise_hat
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x - h * drift + torch.sqrt(2 * self.noise_scale * t * h) * z

    def _correct(self, model: _Model, x: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        """One Langevin step at time t > 0 with the score read from the velocity."""
        v = model(x, t)
        score = -(x + (1 - t) * v) / t
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        # The floor only guards an exactly zero score; any real batch has a far larger norm.
        ratio = _mean_norm(z) / _mean_norm(score).clamp_min(1e-12)
        step = 2 * (self.snr * ratio) ** 2
        return x + step * score + torch.sqrt(2 * step) * z


class ConsistencySampler(Sampler):
    """Multistep consistency sampling: read x0_hat = x - t v at each grid time, re-noise it to the next one.

    The sampler of distilled students (consistency models, DMD2's few-step generator): from
    x at time t the model's denoised guess is x0_hat = x - t v, and the next state is
    (1 - t_next) x0_hat + t_next z with fresh noise z; the last step returns x0_hat. One step is
    exactly one Euler step from t = 1 (x - v); each further step costs one evaluation and draws
    fresh noise from `generator`.
    """

    name = "consistency"

    def _integrate(self, model: _Model, x: Tensor, grid: Tensor, generator: torch.Generator | None) -> Tensor:
        for t, t_next in pairwise(grid):
            x0_hat = x - t * model(x, t)
            if t_next <= 0:
                return x0_hat
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = (1 - t_next) * x0_hat + t_next * z
        return x


class TimeShiftSampler(Sampler):
    """Euler with shifted model times (TS-DPM, Li et al. 2024) against exposure bias.

    Before each evaluation, the variance of the current sample (over its non-batch elements) is
    compared with the variance the forward process has at nearby grid times,
    (1 - t)^2 * data_var + t^2 for data of per-element variance `data_var`, and the model is called
    at the closest of the `window` grid times around the scheduled one (indices i - (window - 1) // 2
    to i + window // 2, never the final t = 0). The step then goes from that time to the next
    scheduled grid time, like DDIM from the shifted time: x + (t_next - t_shifted) * v. Each sample
    of the batch gets its own time; window 1 is plain Euler. The expected variance is smallest at
    t = data_var / (1 + data_var) and nearly flat around it, so there the variance hardly tells
    times apart; the window keeps the choice near the schedule.
    """

    name = "time_shift"

    def __init__(self, window: int = 3, data_var: float = 1.0, shift: float = 1.0) -> None:
        super().__init__(shift)
        if isinstance(window, bool) or int(window) != window or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.window = int(window)
        self.data_var = _check_positive("data_var", data_var)

    def _integrate(self, model: _Model, x: Tensor, grid: Tensor, generator: torch.Generator | None) -> Tensor:
        for i in range(len(grid) - 1):
            t = self._model_time(x, grid, i)
            x = x + _per_sample(grid[i + 1] - t, x) * model(x, t)
        return x

    def _candidates(self, grid: Tensor, i: int) -> Tensor:
        """The grid times in the window around index i, excluding the final t = 0."""
        low = max(0, i - (self.window - 1) // 2)
        high = min(len(grid) - 2, i + self.window // 2)
        return grid[low:high + 1]

    def _model_time(self, x: Tensor, grid: Tensor, i: int) -> Tensor:
        """Per sample, the candidate time whose expected variance is closest to the sample's."""
        if self.window == 1:
            return grid[i]
        times = self._candidates(grid, i).to(x.dtype)
        expected = (1 - times) ** 2 * self.data_var + times**2
        # Population variance (no Bessel correction), so a single-element sample still has one.
        observed = x.reshape(x.shape[0], -1).var(dim=1, correction=0)
        best = (observed[:, None] - expected[None, :]).abs().argmin(dim=1)
        return times[best].to(torch.float32)


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (EulerSampler, HeunSampler, EulerMaruyamaSampler, TimeShiftSampler, ConsistencySampler)
}


def build_sampler(name: str, **options) -> Sampler:
    """The sampler registered under `name`, built with `options` (its constructor's keywords)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name](**options)


def guided_velocity(
    cond_fn: VelocityFn, uncond_fn: VelocityFn, scale: float, interval: tuple[float, float] | None = None,
) -> VelocityFn:
    """Classifier-free guidance v_u + scale (v_c - v_u), applied only for t in `interval` if given.

    `interval` = (t_low, t_high) guides samples with t_low < t <= t_high (Kynkäänniemi et al. 2024);
    elsewhere the conditional velocity alone is used, and the unconditional one is not evaluated
    when no sample of the batch is inside. Scale 1 evaluates only the conditional velocity. Guided
    velocities are computed and returned in float32.
    """
    if interval is not None:
        low, high = (float(v) for v in interval)
        if not low <= high:
            raise ValueError(f"guidance interval must be (t_low, t_high) with t_low <= t_high, got {interval!r}")
    if scale == 1.0:
        return cond_fn

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        conditional = cond_fn(x, t).float()
        if interval is None:
            return _guide(conditional, uncond_fn(x, t).float(), scale)
        inside = (t > low) & (t <= high)
        if not bool(inside.any()):
            return conditional
        guided = _guide(conditional, uncond_fn(x, t).float(), scale)
        return torch.where(_per_sample(inside, guided), guided, conditional)

    return velocity


def _guide(conditional: Tensor, unconditional: Tensor, scale: float) -> Tensor:
    return unconditional + scale * (conditional - unconditional)
