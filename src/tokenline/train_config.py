"""Hyperparameters of every training loop (tokenizer, generator, probe): plain dataclasses that params.yaml validates directly.

Kept free of torch so `tokenline.config` types `*.train` with them cheaply; each is saved in its
run's state folder and read back from JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ConfigDict, StrictInt

# Pydantic reads this when a dataclass is a params field: unknown keys fail with their name.
_STRICT = ConfigDict(extra="forbid")

# More steps than any run takes: a typo like 1e20 fails at params load, not after upstream stages ran.
MAX_COUNT = 10**9


def check_count(config: Any, name: str, low: int = 1) -> None:
    """`config.name` is a whole number (not a bool) in [low, MAX_COUNT]."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, not {value!r}")
    if not low <= value <= MAX_COUNT:
        raise ValueError(f"{name} must be in [{low}, {MAX_COUNT}], not {value}")


def check_rate(config: Any, name: str, low: float = 0.0, positive: bool = False) -> None:
    """`config.name` is a finite number >= low (> low when `positive`)."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    if value < low or (positive and value == low):
        raise ValueError(f"{name} must be {'>' if positive else '>='} {low}, not {value}")


def check_loop_settings(config: Any) -> None:
    """The checks every training-loop config shares: precision, whole counts, a positive lr, an EMA decay in [0, 1)."""
    if config.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', not {config.mixed_precision!r}")
    for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
        check_count(config, name)
    check_count(config, "warmup_steps", low=0)
    check_count(config, "seed", low=0)
    check_rate(config, "lr", positive=True)
    for name in ("weight_decay", "grad_clip"):
        check_rate(config, name)
    if not 0.0 <= config.min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], not {config.min_lr_ratio}")
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

    steps: StrictInt = 1000             # optimizer steps in total (a resumed run continues up to this)
    batch_size: StrictInt = 32          # images per step (per process under `accelerate launch`)
    lr: float = 1e-4              # peak learning rate, reached at the end of warmup
    weight_decay: float = 1e-4    # AdamW decoupled weight decay
    warmup_steps: StrictInt = 100       # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1     # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0        # max global gradient norm; 0 turns clipping off
    ema_decay: float = 0.999      # EMA weight of the old shadow per step; 0: shadow == model
    checkpoint_every: StrictInt = 500   # steps between state folders (one is always written at the end)
    seed: StrictInt = 0                 # seeds torch, numpy, random and the data order
    mixed_precision: str = "no"   # "no" | "bf16" | "fp16"; CPU uses "no"
    log_every: StrictInt = 10           # steps between log_fn calls (MLflow metrics)
    # Train the decoder only (TiTok's decoder fine-tuning): the encoder and quantizer keep the
    # exported weights they start from and run in eval mode, so every latent, the token cache
    # and any generator trained on it stay valid. Meant for `--resume` of a trained tokenizer.
    freeze_encoder: bool = False
    # Two-stage training (TiTok; tokenline.tokenizer.two_stage): with a grid teacher, the first
    # proxy_steps steps learn the teacher's latents, the rest fine-tune the decoder on pixels with
    # the encoder frozen. 0: pixels from the first step (and no teacher is needed).
    proxy_steps: StrictInt = 0
    # A denoising decoder (l-DeTok's idea, on the decoder side): in the pixel phase the decoder reads
    # latents + u * latent_noise * std(latents) * N(0, 1), u ~ U(0, 1) per image, so it learns to
    # paint the latents a generator gets slightly wrong, not only the encoder's. 0: clean latents.
    latent_noise: float = 0.0
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self):
        if isinstance(self.loss, dict):  # from a saved train_config.json
            self.loss = LossConfig(**self.loss)
        check_loop_settings(self)
        check_count(self, "proxy_steps", low=0)
        if not 0 <= self.latent_noise <= 4:
            raise ValueError(f"latent_noise must be in [0, 4] (latent standard deviations), not {self.latent_noise}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields; `proxy_steps` and `latent_noise` only when used, so older configs (and their hashes) stay as they were."""
        values = asdict(self)
        for name in ("proxy_steps", "latent_noise"):
            if not values[name]:
                del values[name]
        return values


@dataclass
class GeneratorTrainConfig:
    """Hyperparameters of one generator training run; saved in the state folder."""
    __pydantic_config__ = _STRICT

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


@dataclass
class ProbeTrainConfig:
    """How the probe is trained: AdamW, warm-up then cosine, random resized crops."""
    __pydantic_config__ = _STRICT

    steps: StrictInt = 1000
    batch_size: StrictInt = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: StrictInt = 50
    seed: StrictInt = 0
    augment: bool = True  # random resized crop, area (0.8, 1); no flips (they would break left/right captions)
    log_every: StrictInt = 50  # steps between log_fn calls

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            check_count(self, name)
        check_count(self, "warmup_steps", low=0)
        check_count(self, "seed", low=0)
        check_rate(self, "lr", positive=True)
        check_rate(self, "weight_decay")
        if self.steps < 1 or self.batch_size < 2 or self.log_every < 1 or self.warmup_steps < 0:
            raise ValueError(
                "probe training needs steps >= 1, batch_size >= 2 (a contrastive batch needs negatives), "
                f"log_every >= 1 and warmup_steps >= 0; got {self}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields."""
        return asdict(self)
