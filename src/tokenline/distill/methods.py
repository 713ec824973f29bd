"""The distillation methods as recipes: each says what the student trains on, its loss at a step, and how it samples.

| method       | teacher | trains on                                   | samples with |
|--------------|---------|---------------------------------------------|--------------|
| reflow       | flow    | the pair cache (noise, teacher ODE endpoint)| euler        |
| consistency  | flow    | the token cache, teacher ODE steps as targets| consistency |
| dmd          | flow    | the token cache (GAN reals); a critic       | consistency  |
| mask_distill | masked  | the pair cache (the teacher's decoded codes)| rounds       |

Every student starts from the teacher's weights and learns the teacher's guided (CFG) outputs,
so it samples at guidance 1: half the network evaluations per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenline.config import StudentParams
from tokenline.distill.dmd import (
    CriticTrainer,
    distribution_matching_loss,
    dmd_direction,
    noised,
    simulated_input,
    student_sample,
)
from tokenline.distill.objectives import (
    consistency_distillation_loss,
    curriculum_levels,
    huber_scale,
    karras_sigmas,
    lognormal_level_probabilities,
    mask_distill_loss,
    reflow_distill_loss,
    reflow_loss,
    u_shaped_times,
)
from tokenline.distill.pairs import PairSet, ensure_pairs
from tokenline.distill.teacher import Teacher
from tokenline.generator.train import cache_batches, text_batch
from tokenline.tokenizer.token_cache import TokenCache
from tokenline.training_loop import BatchesFrom, Companion, LossFn

PAIRS = "pairs"  # the pair cache's folder inside the student's work folder


@dataclass
class Recipe:
    """What a method trains on (a batch stream from any data position), its loss, and the student's sampler."""

    batches_from: BatchesFrom
    loss: LossFn
    sampler: str
    settings: dict[str, Any] = field(default_factory=dict)
    pairs: dict[str, Tensor] | None = None  # the pair cache, for methods that draw one
    companion: Companion | None = None  # a second model the loss trains (DMD2's critic)


def _dropped(rows: dict[str, Tensor], share: float) -> Tensor | None:
    """Caption dropout from the global RNG (restored on resume); None when off."""
    return torch.rand(len(rows["index"])) < share if share > 0 else None


def reflow(teacher: Teacher, p: StudentParams, cache: TokenCache, work: Path, resume: bool) -> Recipe:
    """2-rectified flow on the teacher's pairs with U-shaped t and pseudo-Huber, then the last share at t = 1 only."""
    pairs = ensure_pairs(work / PAIRS, teacher, cache, p.pairs, p.train.seed, resume)
    data = PairSet(pairs, cache, work / PAIRS)
    c = huber_scale(p.huber_c, teacher.model)
    switch = round(p.train.steps * (1 - p.reflow.distill_share))

    def loss(model, raw_model, rows: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        text, drop = text_batch(rows), _dropped(rows, p.train.caption_dropout)
        x0, noise = rows["endpoint"], rows["noise"]
        if step >= switch:
            return reflow_distill_loss(model, x0, noise, text, c, drop), {}
        return reflow_loss(model, x0, noise, text, u_shaped_times(len(x0), p.reflow.time_a), c, drop), {}

    return Recipe(lambda start, rank, world: cache_batches(data, p.train.batch_size, p.train.seed, start, rank, world), loss, "euler",
                  {**p.reflow.model_dump(), "huber_c": p.huber_c, "pairs": p.pairs, "distill_from_step": switch}, pairs)


def consistency(teacher: Teacher, p: StudentParams, cache: TokenCache, work: Path, resume: bool) -> Recipe:
    """Consistency distillation: the target is the student's own stop-gradient output one teacher Euler step closer to data."""
    s = p.consistency
    c = huber_scale(p.huber_c, teacher.model)

    def loss(model, raw_model, rows: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        text, drop = text_batch(rows), _dropped(rows, p.train.caption_dropout)
        levels = curriculum_levels(step, p.train.steps, s.s0, s.s1)
        sigmas = karras_sigmas(levels, s.sigma_min, s.sigma_max, s.rho)
        probabilities = lognormal_level_probabilities(sigmas, s.p_mean, s.p_std)
        x0 = raw_model.normalize(rows["latents"])
        value = consistency_distillation_loss(model, teacher.velocity(text, drop), x0, text, sigmas, probabilities,
                                              c, drop)
        return value, {"levels": torch.tensor(float(levels))}

    return Recipe(lambda start, rank, world: cache_batches(cache, p.train.batch_size, p.train.seed, start, rank, world), loss, "consistency",
                  {**s.model_dump(), "huber_c": p.huber_c})


def mask_distill(teacher: Teacher, p: StudentParams, cache: TokenCache, work: Path, resume: bool) -> Recipe:
    """The masked teacher's guided many-round codes, learned from the masked states of the student's few rounds."""
    pairs = ensure_pairs(work / PAIRS, teacher, cache, p.pairs, p.train.seed, resume)
    data = PairSet(pairs, cache, work / PAIRS)

    def loss(model, raw_model, rows: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        return mask_distill_loss(model, rows["codes"], text_batch(rows), p.steps,
                                 _dropped(rows, p.train.caption_dropout)), {}

    return Recipe(lambda start, rank, world: cache_batches(data, p.train.batch_size, p.train.seed, start, rank, world), loss,
                  teacher.sampling.sampler, {"pairs": p.pairs}, pairs)


def dmd(teacher: Teacher, p: StudentParams, cache: TokenCache, work: Path, resume: bool) -> Recipe:
    """DMD2: the teacher's guided score as real, a critic trained on the student's samples as fake, a GAN head; no regression."""
    d = p.dmd
    trainer = CriticTrainer(teacher.model, d.critic_lr or p.train.lr, d.critic_gan_weight, (d.min_t, d.max_t))

    def loss(model, raw_model, rows: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        text = text_batch(rows)
        real = raw_model.normalize(rows["latents"])
        for _ in range(d.critic_steps):
            x, t = simulated_input(raw_model, torch.randn_like(real), text, p.steps)
            with torch.no_grad():
                fake = student_sample(raw_model, x, t, text)
            terms = trainer.update(fake, real, text)
        x, t = simulated_input(raw_model, torch.randn_like(real), text, p.steps)
        sample = student_sample(model, x, t, text)
        x_t, time, _ = noised(sample, d.min_t, d.max_t)
        direction = dmd_direction(sample, x_t, time, teacher.velocity(text),
                                  lambda y, s: trainer.critic.velocity(y, s, text))
        matching = distribution_matching_loss(sample, direction)
        gan = F.softplus(-trainer.critic.logits(x_t, time, text)).mean()
        return matching + d.gan_weight * gan, {"dm_loss": matching.detach(), "gan_loss": gan.detach(), **terms}

    return Recipe(lambda start, rank, world: cache_batches(cache, p.train.batch_size, p.train.seed, start, rank, world),
                  loss, "consistency", {**d.model_dump(), "steps": p.steps}, companion=trainer)


RECIPES: dict[str, Callable[[Teacher, StudentParams, TokenCache, Path, bool], Recipe]] = {
    "reflow": reflow, "consistency": consistency, "dmd": dmd, "mask_distill": mask_distill,
}
