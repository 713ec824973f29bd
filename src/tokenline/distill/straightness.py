"""How straight a flow's trajectories are: the mean squared gap between each velocity and the trajectory's chord."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor

from tokenline.generator.samplers import VelocityFn, time_grid


@torch.no_grad()
def straightness(velocity: VelocityFn, noise: Tensor, steps: int) -> float:
    """Mean over the Euler trajectory from `noise` of |v(x_t, t) - (noise - x_end)|^2 per element: 0 for straight lines.

    Rectified flow's straightness S(Z) (Liu et al. 2023) on a `steps`-step grid; a one-step
    student's single velocity is its chord, so its straightness is 0 by construction.
    """
    x, velocities = noise, []
    for t, t_next in pairwise(time_grid(steps)):
        v = velocity(x, t.repeat(len(x))).float()
        velocities.append(v)
        x = x + (t_next - t) * v
    chord = noise - x
    return float(torch.stack([(v - chord).pow(2).mean() for v in velocities]).mean())
