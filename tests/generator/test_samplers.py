"""Flow samplers: agreement with diffusers, exactness on a Gaussian flow, guidance, NFE, determinism.

The Gaussian flow: for data x0 ~ N(mu, s^2) per dimension and noise eps ~ N(0, 1), x_t is Gaussian
with mean m_t = (1 - t) mu and variance var_t = (1 - t)^2 s^2 + t^2, and Cov(eps - x0, x_t) =
t - (1 - t) s^2, so the exact velocity E[eps - x0 | x_t = x] is linear in x:

    v*(x, t) = a(t) (x - m_t) - mu,    a(t) = (t - (1 - t) s^2) / var_t.

Its ODE maps noise z at t = 1 to mu + s z at t = 0 exactly (x_t = m_t + sqrt(var_t) z solves it),
so ODE samplers are checked sample by sample, and SDE samplers through the mean and std.
"""

from __future__ import annotations

import pytest
import torch

from tokenline.generator.samplers import (
    SAMPLERS,
    CountingVelocity,
    EulerMaruyamaSampler,
    EulerSampler,
    HeunSampler,
    SampleResult,
    TimeShiftSampler,
    build_sampler,
    guided_velocity,
    time_grid,
)

N, D = 20_000, 8
MU = torch.linspace(-1.5, 2.0, D)
S = torch.linspace(0.3, 1.5, D)


def gaussian_velocity(mu, s):
    """The exact rectified-flow velocity for data N(mu, s^2) per dimension (module docstring)."""

    def velocity(x, t):
        t = t.reshape(-1, *([1] * (x.dim() - 1)))
        var = (1 - t) ** 2 * s**2 + t**2
        a = (t - (1 - t) * s**2) / var
        return a * (x - (1 - t) * mu) - mu

    return velocity


def toy_velocity(x, t):
    """A fixed velocity, linear in x, with t entering both the slope and the offset."""
    t = t.reshape(-1, *([1] * (x.dim() - 1)))
    return (0.8 - 1.5 * t) * x + 0.3 * t - 0.2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def noise():
    # Seed 0 for the noise; stochastic samplers draw from other seeds, or their first draws would
    # repeat the noise and correlate with it.
    return torch.randn(N, D, generator=torch.Generator().manual_seed(0))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def max_error(x, noise):
    """Largest deviation from the exact ODE map noise -> MU + S * noise."""
    return (x - (MU + S * noise)).abs().max().item()


def assert_gaussian(x, mu=MU, s=S, mean_tol=0.03, std_tol=0.03):
    """Per dimension, mean within mean_tol * s of mu and std within std_tol (relative) of s."""
    mean_error = ((x.mean(0) - mu) / s).abs().max().item()
    std_error = (x.std(0) / s - 1).abs().max().item()
    assert mean_error < mean_tol, f"mean off by {mean_error:.4f} s"
    assert std_error < std_tol, f"std off by {std_error:.4f} (relative)"


# -----------------------------------------------------------------------------
# Time grid and diffusers' flow-match Euler
# -----------------------------------------------------------------------------


def test_time_grid_runs_from_noise_to_data():
    grid = time_grid(10)
    assert grid.dtype == torch.float32 and grid.shape == (11,)
    assert grid[0] == 1.0 and grid[-1] == 0.0
    assert torch.allclose(grid, torch.linspace(1, 0, 11))
    shifted = time_grid(10, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert torch.all(shifted[1:] < shifted[:-1])
    # A shift > 1 spends more steps at high noise: every inner time moves towards t = 1.
    assert torch.all(shifted[1:-1] > grid[1:-1])
    assert shifted[5].item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))


@pytest.fixture(scope="module")
def diffusers_scheduler():
    module = pytest.importorskip("diffusers")
    return module.FlowMatchEulerDiscreteScheduler


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_matches_diffusers_flow_match_euler(diffusers_scheduler, shift):
    steps = 8
    scheduler = diffusers_scheduler(shift=shift)
    # Unshifted times in; the scheduler applies its own shift and appends t = 0.
    scheduler.set_timesteps(sigmas=time_grid(steps)[:-1].tolist())
    assert torch.allclose(scheduler.sigmas, time_grid(steps, shift=shift), atol=1e-6)

    noise = torch.randn(4, 3, 5, generator=seeded(0))
    x = noise.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        v = toy_velocity(x, scheduler.sigmas[i].expand(x.shape[0]))
        x = scheduler.step(v, timestep, x).prev_sample
    ours = EulerSampler(shift=shift).sample(toy_velocity, noise, steps)
    assert ours.nfe == steps
    assert torch.allclose(ours.x, x, atol=1e-5)
    assert not torch.allclose(ours.x, noise, atol=1e-2)  # the comparison is not between two no-ops


# -----------------------------------------------------------------------------
# Exactness on the Gaussian flow
# -----------------------------------------------------------------------------


def test_euler_200_steps_reaches_the_exact_map(noise):
    result = EulerSampler().sample(gaussian_velocity(MU, S), noise, 200)
    assert result.nfe == 200
    assert max_error(result.x, noise) < 0.06  # measured 0.039
    assert_gaussian(result.x)


def test_heun_50_steps_reaches_the_exact_map(noise):
    result = HeunSampler().sample(gaussian_velocity(MU, S), noise, 50)
    assert result.nfe == 2 * 50 - 1
    assert max_error(result.x, noise) < 5e-3  # measured 2.2e-3
    assert_gaussian(result.x)


def test_heun_is_second_order_and_euler_first(noise):
    velocity = gaussian_velocity(MU, S)
    euler = {n: max_error(EulerSampler().sample(velocity, noise, n).x, noise) for n in (10, 20)}
    heun = {n: max_error(HeunSampler().sample(velocity, noise, n).x, noise) for n in (10, 20)}
    # Halving the step divides the error by ~2 (Euler, measured 1.94) and ~4 (Heun, measured 4.23).
    assert 1.6 < euler[10] / euler[20] < 2.4
    assert 3.3 < heun[10] / heun[20] < 5.0
    # At the same number of steps (0.061 vs 0.73) and even at about the same NFE (19 vs 20: 0.37).
    assert heun[10] < euler[10] / 5
    assert heun[10] < euler[20] / 3


def test_euler_maruyama_keeps_the_marginals(noise):
    sampler = EulerMaruyamaSampler(noise_scale=1.0)
    result = sampler.sample(gaussian_velocity(MU, S), noise, 200, generator=seeded(1))
    assert result.nfe == 200
    assert_gaussian(result.x)  # measured: mean within 0.011 s, std within 1.3 %
    # Stochastic: far from the ODE's sample-by-sample map, while the distribution is right.
    assert max_error(result.x, noise) > 1.0


def test_euler_maruyama_without_noise_is_euler(noise):
    velocity = gaussian_velocity(MU, S)
    sde = EulerMaruyamaSampler(noise_scale=0.0).sample(velocity, noise, 12, generator=seeded(1))
    assert torch.equal(sde.x, EulerSampler().sample(velocity, noise, 12).x)


ISO_MU, ISO_S = 0.5, 0.6  # isotropic data: one Langevin step size fits every dimension


def pooled_std(x):
    return ((x - ISO_MU) / ISO_S).std().item()


def test_corrector_keeps_the_distribution(noise):
    velocity = gaussian_velocity(ISO_MU, ISO_S)
    plain = EulerMaruyamaSampler().sample(velocity, noise, 50, generator=seeded(1))
    corrected = EulerMaruyamaSampler(corrector_steps=1, snr=0.16).sample(velocity, noise, 50, generator=seeded(1))
    assert corrected.nfe == 50 + (50 - 1)
    assert not torch.allclose(corrected.x, plain.x, atol=0.1)
    # Measured 0.990 and 1.003 (ratio 1.013): Langevin's own bias at snr 0.16 is about snr^2 / 2 = 1.3 %.
    assert abs(pooled_std(plain.x) - 1) < 0.02
    assert abs(pooled_std(corrected.x) / pooled_std(plain.x) - 1) < 0.03
    assert abs(((corrected.x - ISO_MU) / ISO_S).mean().item()) < 0.02


def test_corrector_repairs_a_wrong_start(noise):
    # Twice too wide a start: the ODE carries the error to the end, the Langevin steps remove it.
    velocity = gaussian_velocity(ISO_MU, ISO_S)
    ode = EulerMaruyamaSampler(noise_scale=0.0).sample(velocity, 2 * noise, 50)
    corrected = EulerMaruyamaSampler(noise_scale=0.0, corrector_steps=2).sample(
        velocity, 2 * noise, 50, generator=seeded(1),
    )
    assert pooled_std(ode.x) > 1.9  # measured 1.95
    assert abs(pooled_std(corrected.x) - 1) < 0.04  # measured 1.009


def test_time_shift_with_window_one_is_euler(noise):
    velocity = gaussian_velocity(MU, S)
    shifted = TimeShiftSampler(window=1).sample(velocity, noise, 10)
    euler = EulerSampler().sample(velocity, noise, 10)
    assert shifted.nfe == euler.nfe == 10
    assert torch.equal(shifted.x, euler.x)


def test_time_shift_calls_the_model_at_the_time_matching_the_variance():
    seen = []

    def velocity(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    grid = time_grid(10)
    # Sample 0 has the variance of t = 1; sample 1 that of t = 0.9 ((1 - t)^2 + t^2 = 0.82).
    noise = torch.randn(2, 4096, generator=seeded(0))
    noise = noise / noise.std(dim=1, correction=0, keepdim=True)
    noise[1] *= (0.1**2 + 0.9**2) ** 0.5
    result = TimeShiftSampler(window=3, data_var=1.0).sample(velocity, noise, 10)
    assert result.nfe == 10
    assert torch.equal(seen[0], torch.stack([grid[0], grid[1]]))
    # The zero velocity leaves every variance as it is: each sample is called at its own time while
    # that lies in the window (grid indices i - 1 .. i + 1), then at the window's noisiest time.
    # (Only while t > 0.5: there the expected variance has its minimum and stops telling times apart.)
    for i, times in enumerate(seen[:4]):
        assert torch.equal(times, torch.stack([grid[max(0, i - 1)], grid[max(1, i - 1)]])), i
    for i, times in enumerate(seen):
        window = grid[max(0, i - 1):min(i + 2, 10)]
        assert torch.isin(times, window).all(), i
    assert torch.equal(result.x, noise)


def test_time_shift_corrects_eulers_variance_loss():
    # Zero-mean data of variance data_var, as TS-DPM's variance model assumes; many elements per
    # sample, so each sample's variance is a sharp estimate.
    s = 0.6
    velocity = gaussian_velocity(0.0, s)
    noise = torch.randn(500, 256, generator=seeded(0))
    euler = EulerSampler().sample(velocity, noise, 20)
    shifted = TimeShiftSampler(window=3, data_var=s**2).sample(velocity, noise, 20)
    assert shifted.nfe == 20
    euler_gap, shifted_gap = abs(euler.x.std().item() / s - 1), abs(shifted.x.std().item() / s - 1)
    assert euler_gap > 0.04  # measured 0.066: Euler shrinks the variance at 20 steps
    assert shifted_gap < euler_gap / 2  # measured 0.014


# -----------------------------------------------------------------------------
# Guidance and evaluation counts
# -----------------------------------------------------------------------------


def linear_fns(offset_cond=1.0, offset_uncond=-2.0):
    cond = CountingVelocity(lambda x, t: x + offset_cond)
    uncond = CountingVelocity(lambda x, t: 2 * x + offset_uncond)
    return cond, uncond


def test_guidance_scale_one_evaluates_only_the_conditional():
    cond, uncond = linear_fns()
    x, t = torch.randn(3, 4), torch.full((3,), 0.5)
    v = guided_velocity(cond, uncond, 1.0)(x, t)
    assert torch.equal(v, x + 1.0)
    assert (cond.calls, uncond.calls) == (1, 0)


def test_guidance_scale_zero_is_the_unconditional_and_scale_mixes():
    cond, uncond = linear_fns()
    x, t = torch.randn(3, 4), torch.full((3,), 0.5)
    assert torch.equal(guided_velocity(cond, uncond, 0.0)(x, t), 2 * x - 2.0)
    expected = (2 * x - 2.0) + 4.0 * ((x + 1.0) - (2 * x - 2.0))
    assert torch.allclose(guided_velocity(cond, uncond, 4.0)(x, t), expected)
    assert (cond.calls, uncond.calls) == (2, 2)


def test_guidance_interval_skips_the_unconditional_outside_it():
    cond, uncond = linear_fns()
    velocity = CountingVelocity(guided_velocity(cond, uncond, 3.0, interval=(0.25, 0.65)))
    EulerSampler().sample(velocity, torch.randn(2, 5, generator=seeded(0)), 10)
    # Grid times 1.0, 0.9, ..., 0.1: only 0.6, 0.5, 0.4 and 0.3 lie in (0.25, 0.65].
    assert velocity.calls == cond.calls == 10
    assert uncond.calls == 4


def test_guidance_interval_applies_per_sample():
    cond, uncond = linear_fns()
    x, t = torch.randn(2, 4), torch.tensor([0.9, 0.5])
    v = guided_velocity(cond, uncond, 3.0, interval=(0.2, 0.7))(x, t)
    assert torch.equal(v[0], x[0] + 1.0)
    assert torch.allclose(v[1], (2 * x[1] - 2.0) + 3.0 * ((x[1] + 1.0) - (2 * x[1] - 2.0)))


@pytest.mark.parametrize(
    ("sampler", "nfe"),
    [
        (EulerSampler(), 7),
        (HeunSampler(), 2 * 7 - 1),
        (EulerMaruyamaSampler(), 7),
        (EulerMaruyamaSampler(corrector_steps=2), 7 + 2 * (7 - 1)),
        (TimeShiftSampler(window=3), 7),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_counted_evaluations(sampler, nfe):
    counted = CountingVelocity(toy_velocity)
    result = sampler.sample(counted, torch.randn(2, 3, 4, generator=seeded(0)), 7, generator=seeded(1))
    assert isinstance(result, SampleResult)
    assert counted.calls == result.nfe == nfe


# -----------------------------------------------------------------------------
# Determinism, dtypes, registry, invalid input
# -----------------------------------------------------------------------------


def test_euler_maruyama_is_reproducible_from_its_generator():
    noise = torch.randn(4, 16, generator=seeded(0))
    sampler = EulerMaruyamaSampler(corrector_steps=1)
    first = sampler.sample(toy_velocity, noise, 10, generator=seeded(7)).x
    again = sampler.sample(toy_velocity, noise, 10, generator=seeded(7)).x
    other = sampler.sample(toy_velocity, noise, 10, generator=seeded(8)).x
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_model_sees_the_noise_dtype_and_float32_times():
    seen = []

    def velocity(x, t):
        seen.append((x.dtype, t.dtype, tuple(t.shape)))
        return toy_velocity(x.float(), t).to(x.dtype)

    noise = torch.randn(3, 4, 8, generator=seeded(0)).to(torch.bfloat16)
    for name in SAMPLERS:
        seen.clear()
        result = build_sampler(name).sample(velocity, noise, 4, generator=seeded(1))
        assert result.x.dtype == torch.bfloat16 and result.x.shape == noise.shape
        assert set(seen) == {(torch.bfloat16, torch.float32, (3,))}, name


def test_wide_noise_keeps_its_precision():
    noise = torch.randn(3, 5, dtype=torch.float64, generator=seeded(0))
    result = EulerSampler().sample(toy_velocity, noise, 6)
    assert result.x.dtype == torch.float64
    assert torch.allclose(result.x.float(), EulerSampler().sample(toy_velocity, noise.float(), 6).x, atol=1e-5)


def test_build_sampler_by_name_with_options():
    assert set(SAMPLERS) == {"euler", "heun", "euler_maruyama", "time_shift", "consistency"}
    for name, cls in SAMPLERS.items():
        built = build_sampler(name)
        assert type(built) is cls and built.name == name
    sde = build_sampler("euler_maruyama", noise_scale=0.5, corrector_steps=2, snr=0.1, shift=3.0)
    assert (sde.noise_scale, sde.corrector_steps, sde.snr, sde.shift) == (0.5, 2, 0.1, 3.0)


def test_unknown_sampler_names_the_known_ones():
    with pytest.raises(ValueError, match="nope") as error:
        build_sampler("nope")
    for name in SAMPLERS:
        assert name in str(error.value)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_steps_below_one_are_refused(steps):
    with pytest.raises(ValueError, match="steps"):
        time_grid(steps)
    for name in SAMPLERS:
        with pytest.raises(ValueError, match="steps"):
            build_sampler(name).sample(toy_velocity, torch.randn(2, 3), steps)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("euler", {"shift": 0.0}),
        ("euler_maruyama", {"noise_scale": -1.0}),
        ("euler_maruyama", {"corrector_steps": -1}),
        ("euler_maruyama", {"snr": 0.0}),
        ("time_shift", {"window": 0}),
        ("time_shift", {"data_var": -1.0}),
    ],
)
def test_invalid_options_are_refused(name, options):
    with pytest.raises(ValueError):
        build_sampler(name, **options)


def test_inverted_guidance_interval_is_refused():
    cond, uncond = linear_fns()
    with pytest.raises(ValueError, match="interval"):
        guided_velocity(cond, uncond, 2.0, interval=(0.7, 0.2))
