"""DMD2 (Yin et al. 2024): distribution matching distillation with a fake-score critic, two time scales and a GAN head.

Per student step:

1. `critic_steps` critic updates (two time scales; DMD2 uses 5): the fake score, a trainable
   copy of the teacher, learns the flow of the student's current samples (flow matching), and a
   GAN head on its pooled features learns real latents (the token cache) from the student's,
   both noised to the same t (softplus losses);
2. the student's update: its sample x is noised to x_t and the distribution-matching direction
   is (x0_fake - x0_real) / mean|x - x0_real|, x0_real the frozen teacher's guided denoised guess
   and x0_fake the critic's; the loss 0.5 |x - sg(x - direction)|^2 has exactly that gradient in x.
   The GAN term softplus(-D(x_t)) joins it; there is no regression loss.

A multi-step student trains with backward simulation: its input at a random grid time comes from
its own earlier steps (no gradient), as at sampling (the `consistency` sampler).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenline.generator.model import FlowTransformer, TextBatch
from tokenline.generator.samplers import VelocityFn, time_grid

CRITIC_WEIGHTS = "critic.safetensors"
CRITIC_OPTIMIZER = "critic_optimizer.pt"


class Critic(nn.Module):
    """The fake score (a trainable copy of the teacher) and a GAN head on its pooled token features."""

    def __init__(self, teacher: FlowTransformer):
        super().__init__()
        self.score = copy.deepcopy(teacher).requires_grad_(True).train()
        width = teacher.config.width
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def velocity(self, x: Tensor, t: Tensor, text: TextBatch | None) -> Tensor:
        """The fake score's velocity."""
        return self.score(x, t, text)

    def logits(self, x: Tensor, t: Tensor, text: TextBatch | None) -> Tensor:
        """Real-vs-fake logits [B] of noised latents."""
        features, _ = self.score.features(x, t, text)
        return self.head(features.mean(dim=1)).squeeze(-1)


def dmd_direction(x: Tensor, x_t: Tensor, t: Tensor, real_velocity: VelocityFn, fake_velocity: VelocityFn) -> Tensor:
    """(x0_fake - x0_real) / mean|x - x0_real| per sample: the distribution-matching gradient on x, 0 where fake = real."""
    with torch.no_grad():
        x0_real = x_t - t[:, None, None] * real_velocity(x_t, t)
        x0_fake = x_t - t[:, None, None] * fake_velocity(x_t, t)
        scale = (x - x0_real).abs().mean(dim=(1, 2), keepdim=True).clamp_min(1e-8)
        return (x0_fake - x0_real) / scale


def distribution_matching_loss(x: Tensor, direction: Tensor) -> Tensor:
    """0.5 |x - sg(x - direction)|^2 (mean): its gradient in x is `direction` / elements."""
    return 0.5 * F.mse_loss(x.float(), (x - direction).detach().float())


def noised(x: Tensor, low: float, high: float) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t, noise) at t uniform in [low, high] with fresh noise, from the global RNG."""
    t = low + (high - low) * torch.rand(len(x))
    noise = torch.randn_like(x)
    return (1 - t[:, None, None]) * x + t[:, None, None] * noise, t, noise


def simulated_input(model: FlowTransformer, noise: Tensor, text: TextBatch, steps: int) -> tuple[Tensor, Tensor]:
    """Backward simulation: (the student's input at a random grid time, that time [B]) from its own earlier steps."""
    grid = time_grid(steps)
    stop = int(torch.randint(steps, ()))
    x = noise
    with torch.no_grad():
        for i in range(stop):
            t = grid[i].repeat(len(x))
            x0 = x - t[:, None, None] * model(x, t, text)
            x = (1 - grid[i + 1]) * x0 + grid[i + 1] * torch.randn_like(x)
    return x, grid[stop].repeat(len(x))


def student_sample(model: FlowTransformer, x: Tensor, t: Tensor, text: TextBatch) -> Tensor:
    """The student's denoised output x - t v(x, t) at its input (with gradient)."""
    return x - t[:, None, None] * model(x, t, text)


class CriticTrainer:
    """The critic, its optimizer and its update: a companion of the student's loop, saved in its state folder."""

    def __init__(self, teacher: FlowTransformer, lr: float, gan_weight: float, t_range: tuple[float, float]):
        self.critic = Critic(teacher)
        self.optimizer = torch.optim.AdamW(self.critic.parameters(), lr=lr, betas=(0.0, 0.999), weight_decay=0.0)
        self.gan_weight, self.t_range = gan_weight, t_range

    def update(self, fake: Tensor, real: Tensor, text: TextBatch) -> dict[str, Tensor]:
        """One critic step on detached student samples `fake` and data latents `real`; returns its loss terms."""
        self.optimizer.zero_grad(set_to_none=True)  # the student's backward left gradients here
        fake = fake.detach()
        x_t, t, noise = noised(fake, *self.t_range)
        flow = F.mse_loss(self.critic.velocity(x_t, t, text).float(), (noise - fake).float())
        real_t, real_time, _ = noised(real, *self.t_range)
        gan = (F.softplus(self.critic.logits(x_t, t, text)) + F.softplus(-self.critic.logits(real_t, real_time, text))).mean()
        (flow + self.gan_weight * gan).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"critic_flow_loss": flow.detach(), "critic_gan_loss": gan.detach()}

    def state_tensors(self) -> dict[str, dict[str, Tensor]]:
        """What the state folder keeps as safetensors."""
        return {CRITIC_WEIGHTS: self.critic.state_dict()}

    def state_objects(self) -> dict[str, Any]:
        """What the state folder keeps with torch.save (plain state dicts)."""
        return {CRITIC_OPTIMIZER: self.optimizer.state_dict()}

    def load(self, state_dir: Path) -> None:
        """Restore the critic and its optimizer from a state folder."""
        self.critic.load_state_dict(safetensors.torch.load_file(Path(state_dir) / CRITIC_WEIGHTS))
        self.optimizer.load_state_dict(torch.load(Path(state_dir) / CRITIC_OPTIMIZER, weights_only=True))
