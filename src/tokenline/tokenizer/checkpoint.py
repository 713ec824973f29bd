"""Tokenizer checkpoints: a folder with model.safetensors and config.json, written atomically."""

from __future__ import annotations

from pathlib import Path

from tokenline.model_checkpoint import CONFIG, WEIGHTS, CheckpointError, save_model
from tokenline.tokenizer.model import Tokenizer1D

__all__ = ["CONFIG", "WEIGHTS", "CheckpointError", "load_checkpoint", "save_checkpoint"]


def save_checkpoint(model: Tokenizer1D, folder: str | Path) -> Path:
    """Write the weights, then the config: a folder with a config holds its complete weights."""
    return save_model(model, folder)


def load_checkpoint(folder: str | Path) -> Tokenizer1D:
    """The tokenizer saved in `folder`, on CPU, in eval mode."""
    return Tokenizer1D.from_checkpoint(folder)
