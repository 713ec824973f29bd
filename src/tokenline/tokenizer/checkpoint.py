"""Tokenizer checkpoints: a folder with model.safetensors and config.json, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors
import safetensors.torch

from tokenline.artifacts import atomic_write_bytes, atomic_write_json
from tokenline.tokenizer.model import Tokenizer1D, TokenizerConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or weights that do not fit their config."""


def save_checkpoint(model: Tokenizer1D, folder: str | Path) -> Path:
    """Write the weights, then the config: a folder with a config holds its complete weights."""
    folder = Path(folder)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS, safetensors.torch.save(tensors))
    atomic_write_json(folder / CONFIG, model.config.to_dict())
    return folder


def load_checkpoint(folder: str | Path) -> Tokenizer1D:
    """The tokenizer saved in `folder`, on CPU, in eval mode."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        config = TokenizerConfig.from_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{config_path}: not a valid tokenizer config ({error})") from None
    try:
        tensors = safetensors.torch.load_file(weights_path, device="cpu")
    except (safetensors.SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({error})") from None

    model = Tokenizer1D(config)
    expected = model.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    reshaped = [
        f"{name} {list(tensors[name].shape)} in the file, {list(expected[name].shape)} by the config"
        for name in sorted(expected.keys() & tensors.keys())
        if tensors[name].shape != expected[name].shape
    ]
    if missing or unexpected or reshaped:
        problems = [
            f"{label}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", reshaped))
            if items
        ]
        raise CheckpointError(f"{weights_path} does not match {config_path}: " + "; ".join(problems))
    model.load_state_dict(tensors)
    return model.eval()
