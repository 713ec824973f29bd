"""Hyperparameters of generator training: a plain dataclass that params.yaml validates directly.

Kept free of torch imports so `tokenline.config` can type `generator.train` with it cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ConfigDict, StrictInt

from tokenline.tokenizer.train_config import check_loop_settings


@dataclass
class GeneratorTrainConfig:
    """Hyperparameters of one generator training run; saved in the state folder."""

    # Pydantic reads this when the dataclass is a params field: unknown keys fail with their name.
    __pydantic_config__ = ConfigDict(extra="forbid")

    steps: StrictInt = 2000             # optimizer steps in total (a resumed run continues up to this)
    batch_size: StrictInt = 64          # token sequences per step (per process under `accelerate launch`)
    lr: float = 3e-4              # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.0     # AdamW decoupled weight decay
    warmup_steps: StrictInt = 100       # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1     # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0        # max global gradient norm; 0 turns clipping off
    ema_decay: float = 0.999      # EMA weight of the old shadow per step (warmed up early in the run)
    checkpoint_every: StrictInt = 500   # steps between state folders (one is always written at the end)
    seed: StrictInt = 0                 # seeds torch, numpy, random and the data order
    mixed_precision: str = "no"   # "no" | "bf16" | "fp16"; CPU uses "no"
    log_every: StrictInt = 10           # steps between log_fn calls (MLflow metrics)
    caption_dropout: float = 0.1  # share of captions replaced by the null caption (classifier-free guidance)
    time_mean: float = 0.0        # flow: logit-normal timestep mean
    time_std: float = 1.0         # flow: logit-normal timestep std
    replace_prob: float = 0.0     # masked: share of corrupted codes replaced by random codes (VQ-Diffusion)
    swap_weight: float = 0.0      # flow: weight of the swap term (0: off); needs captions whose swap is a caption too
    swap_temperature: float = 0.02  # flow: loss-gap scale of the swap term's softplus
    swap_min_t: float = 0.5       # flow: rows noised less than this take no part in the swap term

    def __post_init__(self):
        check_loop_settings(self)
        for name in ("caption_dropout", "replace_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), not {getattr(self, name)}")
        if self.time_std <= 0:
            raise ValueError(f"time_std must be > 0, not {self.time_std}")
        if self.swap_weight < 0:
            raise ValueError(f"swap_weight must be >= 0, not {self.swap_weight}")
        if self.swap_temperature <= 0:
            raise ValueError(f"swap_temperature must be > 0, not {self.swap_temperature}")
        if not 0.0 <= self.swap_min_t < 1.0:
            raise ValueError(f"swap_min_t must be in [0, 1), not {self.swap_min_t}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields."""
        return asdict(self)
