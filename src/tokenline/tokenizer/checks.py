"""Checks on tokenizer stage outputs (Dagster asset checks): finite weights."""

from __future__ import annotations

from pathlib import Path

from tokenline.config import Params
from tokenline.layout import output_path
from tokenline.model_checkpoint import non_finite_tensors


def _finite_weights_of(output: str, root: Path, manifest: dict) -> tuple[bool, dict]:
    count, bad = non_finite_tensors(output_path(root, manifest["dataset"], output))
    return not bad, {"tensors": count, "non_finite": ", ".join(bad[:10]) or "none"}


def finite_weights(root: Path, manifest: dict, params: Params) -> tuple[bool, dict]:
    """No tokenizer weight is NaN or infinite."""
    return _finite_weights_of("tokenizer", root, manifest)


def teacher_finite_weights(root: Path, manifest: dict, params: Params) -> tuple[bool, dict]:
    """No weight of the grid teacher is NaN or infinite."""
    return _finite_weights_of("teacher_tokenizer", root, manifest)
