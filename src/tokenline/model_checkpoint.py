"""Model checkpoints as folders: safetensors weights and a JSON config, written atomically, checked on load.

Every model kind (tokenizer, generator, student) keeps a `config` with `to_dict()`; this module
writes the weights before the config, so a folder with a config holds complete weights, and on
load names the file at fault: an unreadable config or weights file, or weights that do not fit
the config (missing, unexpected or reshaped tensors).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import safetensors
import safetensors.torch
from torch import nn

from tokenline.artifacts import atomic_write_bytes, atomic_write_json

WEIGHTS = "model.safetensors"
CONFIG = "config.json"

ModelT = TypeVar("ModelT", bound=nn.Module)
C = TypeVar("C")  # a model config dataclass


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or weights that do not fit their config."""


def save_model(model: nn.Module, folder: str | Path) -> Path:
    """Write the weights, then `model.config.to_dict()`: a folder with a config holds its complete weights."""
    folder = Path(folder)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS, safetensors.torch.save(tensors))
    atomic_write_json(folder / CONFIG, model.config.to_dict())
    return folder


def read_config(folder: str | Path, from_dict: Callable[[dict], Any], kind: str) -> Any:
    """The config of the checkpoint in `folder`, parsed by `from_dict`; errors name the file."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: not a valid {kind} config ({error})") from None


def load_model(folder: str | Path, from_dict: Callable[[dict], Any], build: Callable[[Any], ModelT], kind: str) -> ModelT:
    """The model saved in `folder` (config parsed by `from_dict`, built by `build`), on CPU, in eval mode."""
    folder = Path(folder)
    config = read_config(folder, from_dict, kind)
    weights_path = folder / WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: no such checkpoint file")
    try:
        tensors = safetensors.torch.load_file(weights_path, device="cpu")
    except (safetensors.SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({error})") from None

    model = build(config)
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
        raise CheckpointError(f"{weights_path} does not match {folder / CONFIG}: " + "; ".join(problems))
    model.load_state_dict(tensors)
    return model.eval()


def non_finite_tensors(folder: str | Path) -> tuple[int, list[str]]:
    """(tensor count, names of floating tensors holding NaN or inf) of a checkpoint's weights."""
    import torch

    tensors = safetensors.torch.load_file(Path(folder) / WEIGHTS)
    bad = sorted(name for name, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all())
    return len(tensors), bad


def start_from_checkpoint(model: nn.Module, folder: str | Path, load: Callable[[Path], nn.Module], kind: str,
                          ignore: tuple[str, ...] = ()) -> None:
    """Copy the weights of the checkpoint in `folder` (read by `load`) into `model`, whose config must match but for `ignore`.

    For fine-tuning: the params describe the model, the checkpoint only where it starts, so a
    checkpoint of another architecture is refused naming each differing field.
    """
    start = load(Path(folder))
    ours, theirs = model.config.to_dict(), start.config.to_dict()
    differing = [f"{name} {theirs.get(name)!r} there, {ours.get(name)!r} by params"
                 for name in sorted(ours.keys() | theirs.keys()) if name not in ignore and ours.get(name) != theirs.get(name)]
    if differing:
        raise CheckpointError(f"cannot start this {kind} from {folder}: its config differs: " + "; ".join(differing))
    model.load_state_dict(start.state_dict())


def config_from_dict(config_class: type[C], values: Mapping[str, Any], kind: str) -> C:
    """A model config dataclass from its to_dict output (a checkpoint's config.json); unknown fields are an error naming them."""
    unknown = set(values) - {f.name for f in fields(config_class)}
    if unknown:
        raise ValueError(f"unknown {kind} config fields: {sorted(unknown)}")
    return config_class(**values)
