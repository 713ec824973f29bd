"""Dagster asset checks on the export stage's output."""

from __future__ import annotations

from pathlib import Path

from tokenline.config import Params
from tokenline.export.runtime import PipelineError, read_pipeline
from tokenline.layout import output_path


def files_match(root: Path, manifest: dict, params: Params) -> tuple[bool, dict]:
    """Every file pipeline.json lists is present and matches its sha256; metadata: the parity figure."""
    folder = output_path(root, manifest["dataset"], "onnx")
    try:
        spec = read_pipeline(folder)
    except PipelineError as err:
        return False, {"problem": str(err)}
    return True, {"parity_max_abs_diff": float(spec.get("parity", {}).get("max_abs_diff", float("nan")))}
