"""Hyperparameters of probe training: a plain dataclass that params.yaml validates directly.

Kept free of torch imports so `tokenline.config` can type `probe.train` with it cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ConfigDict, StrictInt

from tokenline.tokenizer.train_config import check_count, check_rate


@dataclass
class ProbeTrainConfig:
    """How the probe is trained: AdamW, warm-up then cosine, random resized crops."""

    # Pydantic reads this when the dataclass is a params field: unknown keys fail with their name.
    __pydantic_config__ = ConfigDict(extra="forbid")

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
