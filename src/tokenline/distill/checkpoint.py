"""Student checkpoints: a generator checkpoint plus `student.json`, the card that says how it was made and how to sample it.

A student is a generator of the teacher's architecture, so its folder is a generator checkpoint
(config.json + model.safetensors) that `load_generator`, gen_eval, `tokenline generate` and the
ONNX export read as they read any generator. `student.json` adds what only a student has: the
method and its settings, the teacher's folder and content hash, the teacher sampling it learned
(its guidance is baked in, so the student samples at guidance 1), and its own sampler and steps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenline.artifacts import atomic_write_json
from tokenline.generator.checkpoint import load_generator, save_generator
from tokenline.generator.generate import SamplingOptions
from tokenline.generator.model import FlowTransformer, MaskedTransformer

CARD = "student.json"


@dataclass(frozen=True)
class StudentCard:
    """What made a student and how it samples: method, sampler and steps, the teacher (folder, hash, sampling)."""

    method: str
    sampler: str  # flow: euler | consistency; masked: the teacher's decoding with `steps` rounds
    steps: int
    teacher: str  # the teacher's folder, relative to the project root
    teacher_hash: str  # the teacher checkpoint's content hash (its manifest's)
    teacher_sampling: dict[str, Any]  # SamplingOptions.describe() of the teacher runs the student learned from
    settings: dict[str, Any] = field(default_factory=dict)  # the method's params (student.<method>, huber_c, ...)

    def sampling(self, seed: int = 0) -> SamplingOptions:
        """How to sample this student: its sampler and steps at guidance 1 (the teacher's guidance is learned)."""
        return SamplingOptions(sampler=self.sampler, steps=self.steps, guidance=1.0, seed=seed)


def save_student(model: FlowTransformer | MaskedTransformer, folder: str | Path, card: StudentCard) -> Path:
    """Write the generator checkpoint, then the card."""
    folder = Path(folder)
    save_generator(model, folder)
    atomic_write_json(folder / CARD, asdict(card))
    return folder


def read_card(folder: str | Path) -> StudentCard | None:
    """The student card in `folder`, or None when the folder is a plain generator (a teacher)."""
    path = Path(folder) / CARD
    if not path.is_file():
        return None
    try:
        return StudentCard(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a valid student card ({error})") from None


def load_student(folder: str | Path) -> tuple[FlowTransformer | MaskedTransformer, StudentCard]:
    """(the student generator, its card); a folder without a card is refused, naming it."""
    card = read_card(folder)
    if card is None:
        raise FileNotFoundError(f"{Path(folder) / CARD}: {folder} is a generator checkpoint, not a student")
    return load_generator(folder), card
