"""Checks on student stage outputs (Dagster asset checks)."""

from __future__ import annotations

from pathlib import Path

from tokenline.config import Params
from tokenline.layout import output_path
from tokenline.model_checkpoint import non_finite_tensors


def finite_weights(root: Path, manifest: dict, params: Params) -> tuple[bool, dict]:
    """No student weight is NaN or infinite."""
    count, bad = non_finite_tensors(output_path(root, manifest["dataset"], "student"))
    return not bad, {"tensors": count, "non_finite": ", ".join(bad[:10]) or "none"}
