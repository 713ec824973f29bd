"""Dagster asset checks on the export stages' outputs."""

from __future__ import annotations

from pathlib import Path

from tokenline.config import Params
from tokenline.export.runtime import PipelineError, read_pipeline
from tokenline.layout import output_path


def files_match(root: Path, manifest: dict, params: Params) -> tuple[bool, dict]:
    """The generator's export (models/<dataset>/onnx): every file present with its sha256; metadata: parity."""
    return pipeline_files_match(output_path(root, manifest["dataset"], "onnx"))


def student_files_match(root: Path, manifest: dict, params: Params) -> tuple[bool, dict]:
    """The student's export (models/<dataset>/student_onnx): every file present with its sha256; metadata: parity."""
    return pipeline_files_match(output_path(root, manifest["dataset"], "student_onnx"))


def pipeline_files_match(folder: Path) -> tuple[bool, dict]:
    """Every file the pipeline.json in `folder` lists is present and matches its sha256; metadata: the parity figure."""
    try:
        spec = read_pipeline(folder)
    except PipelineError as err:
        return False, {"problem": str(err)}
    return True, {"parity_max_abs_diff": float(spec.get("parity", {}).get("max_abs_diff", float("nan")))}
