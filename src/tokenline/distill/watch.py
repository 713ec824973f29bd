"""The student's FID along training (`student.watch`): a few readings a run, cheap enough to take in the loop.

Each reading samples the same val prompts with the same noise from a copy of the EMA weights (what
the stage exports) at the student's own steps, and scores them against as many real images with
the same Inception features as gen_eval. With `samples` images (100 by default, not gen_eval's 500)
the FID is biased upward: compare readings with each other, and with student_eval's figure only
in trend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from tokenline.artifacts import atomic_write_json
from tokenline.eval.generation import GenerationMetrics
from tokenline.generator.generate import SamplingOptions, generate_images
from tokenline.tokenizer.model import Tokenizer1D


@dataclass
class FidWatch:
    """The loop's `watch`: FID of the student's samples for fixed prompts against fixed real images."""

    every: int
    tokenizer: Tokenizer1D
    encoder: object
    prompts: list[str]
    metrics: GenerationMetrics
    options: SamplingOptions
    path: Path  # the readings so far (in the stage's work folder: a resumed run keeps the earlier ones)
    readings: list[dict] = field(default_factory=list)

    def resume(self) -> None:
        """Take up the readings a stopped run wrote."""
        if self.path.is_file():
            self.readings = json.loads(self.path.read_text())

    def __call__(self, step: int, model: nn.Module) -> dict[str, float]:
        """Sample, score, remember (step, fid) and return it for the tracker as `watch_fid`."""
        images, _ = generate_images(model, self.tokenizer, self.prompts, self.encoder, self.options)
        fid = self.metrics.frechet_distance(self.metrics.features(images))
        self.readings = [r for r in self.readings if r["step"] < step] + [{"step": step, "fid": fid}]
        atomic_write_json(self.path, self.readings)
        return {"watch_fid": fid}
