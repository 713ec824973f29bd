"""Hyperparameters of tokenizer training: plain dataclasses that params.yaml validates directly.

Kept free of torch imports so `tokenline.config` can type `tokenizer.train` with them cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ConfigDict

# Pydantic reads this when a dataclass is a params field: unknown keys fail with their name.
_STRICT = ConfigDict(extra="forbid")


def check_loop_settings(config: Any) -> None:
    """The checks every training-loop config shares: precision, positive counts, an EMA decay in [0, 1)."""
    if config.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', not {config.mixed_precision!r}")
    for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, not {getattr(config, name)}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), not {config.ema_decay}")


@dataclass
class LossConfig:
    """Weights of the reconstruction, adversarial and perceptual terms."""

    __pydantic_config__ = _STRICT

    l1: float = 1.0                   # weight of the L1 pixel loss
    l2: float = 1.0                   # weight of the L2 pixel loss
    adversarial: float = 0.1          # weight of the hinge generator loss (times the adaptive weight); 0: no discriminator
    adversarial_start: int = 1000     # step at which the discriminator switches on (warm-up before it)
    disc_lr: float = 1e-4             # discriminator learning rate (AdamW, betas 0.5/0.9)
    disc_width: int = 32              # channels of the first discriminator layer
    disc_layers: int = 2              # strided layers of the PatchGAN; 2 keeps 32 px inputs valid
    perceptual: float = 1.0           # weight of the VGG perceptual term, when its weights exist locally
    perceptual_weights: str | None = None  # local VGG16 `features` weights file; none: skipped with one notice
    # Foreground weighting of the L1 and L2 terms: a pixel that differs from its image's background
    # (the median colour of the image's border) by more than foreground_threshold in some channel
    # weighs 1 + foreground, every other pixel 1, and the terms are weighted means; per image the
    # boost is capped where the foreground would outweigh the background (train.pixel_losses).
    # Small objects on a plain background (the `shapes` scenes: about a tenth of the pixels) are
    # otherwise cheapest to paint over with the background. 0: plain means.
    foreground: float = 0.0
    foreground_threshold: float = 0.1  # in the [-1, 1] pixel range (0.1: about 13 of 255 levels)

    def __post_init__(self):
        for name in ("l1", "l2", "adversarial", "perceptual", "disc_lr", "foreground", "foreground_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, not {getattr(self, name)}")
        if self.adversarial_start < 0 or self.disc_width < 1 or self.disc_layers < 1:
            raise ValueError("loss.adversarial_start must be >= 0, disc_width and disc_layers >= 1")


@dataclass
class TrainConfig:
    """Hyperparameters of one tokenizer training run; saved in the state folder."""

    __pydantic_config__ = _STRICT

    steps: int = 1000             # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 32          # images per step (per process under `accelerate launch`)
    lr: float = 1e-4              # peak learning rate, reached at the end of warmup
    weight_decay: float = 1e-4    # AdamW decoupled weight decay
    warmup_steps: int = 100       # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1     # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0        # max global gradient norm; 0 turns clipping off
    ema_decay: float = 0.999      # EMA weight of the old shadow per step; 0: shadow == model
    checkpoint_every: int = 500   # steps between state folders (one is always written at the end)
    seed: int = 0                 # seeds torch, numpy, random and the data order
    mixed_precision: str = "no"   # "no" | "bf16" | "fp16"; CPU uses "no"
    log_every: int = 10           # steps between log_fn calls (MLflow metrics)
    # Train the decoder only (TiTok's decoder fine-tuning): the encoder and quantizer keep the
    # exported weights they start from and run in eval mode, so every latent, the token cache
    # and any generator trained on it stay valid. Meant for `--resume` of a trained tokenizer.
    freeze_encoder: bool = False
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self):
        if isinstance(self.loss, dict):  # from a saved train_config.json
            self.loss = LossConfig(**self.loss)
        check_loop_settings(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields."""
        return asdict(self)
