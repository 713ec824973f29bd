"""Checks on eval stage outputs (Dagster asset checks)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenline.config import Params


def fid_below_threshold(root: Path, manifest: dict, params: Params) -> tuple[bool, dict]:
    """Generated images are close enough to the real ones in Inception space."""
    from tokenline.pipeline import report_path

    report = json.loads(report_path(root, manifest["dataset"], "gen_eval").read_text())
    fid = report.get("fid")
    metadata = {"fid": fid if fid is not None else "not computed", "threshold": params.gen_eval.max_fid,
                "samples": report.get("samples", 0)}
    return fid is not None and fid <= params.gen_eval.max_fid, metadata
