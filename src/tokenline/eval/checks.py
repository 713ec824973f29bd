"""Checks on eval stage outputs (Dagster asset checks): FID and the release gates, and the tokenizer's rFID and code usage."""

from __future__ import annotations

import json
from pathlib import Path

from tokenline.config import Params
from tokenline.eval.gates import check_gates, scalar_figures
from tokenline.layout import report_path


def fid_below_threshold(root: Path, manifest: dict, params: Params) -> tuple[bool, dict]:
    """Generated images are close enough to the real ones in Inception space."""
    report = json.loads(report_path(root, manifest["dataset"], "gen_eval").read_text())
    fid = report.get("fid")
    metadata = {"fid": fid if fid is not None else "not computed", "threshold": params.gen_eval.max_fid,
                "samples": report.get("samples", 0)}
    return fid is not None and fid <= params.gen_eval.max_fid, metadata


def registry_gates(root: Path, manifest: dict, params: Params) -> tuple[bool, dict]:
    """gen_eval's figures pass registry.gates (gates on figures gen_eval lacks, such as parity, are left to the registry).

    Blocking in Dagster: a model that fails never reaches export and registry in the same run.
    """
    report = json.loads(report_path(root, manifest["dataset"], "gen_eval").read_text())
    failures, skipped = check_gates(list(params.registry.gates), scalar_figures(report))
    return not failures, {"failures": "; ".join(failures) or "none", "skipped": "; ".join(skipped) or "none"}


def _recon_report(root: Path, manifest: dict) -> dict:

    return json.loads(report_path(root, manifest["dataset"], "recon_eval").read_text())


def rfid_below_threshold(root: Path, manifest: dict, params: Params) -> tuple[bool, dict]:
    """Reconstructions are close enough to the originals in Inception space."""
    report = _recon_report(root, manifest)
    rfid = report.get("rfid")
    metadata = {"rfid": rfid if rfid is not None else "not computed", "threshold": params.recon_eval.max_rfid}
    if rfid is None:
        metadata["note"] = report.get("rfid_note", "rFID missing from the report")
        return False, metadata
    return rfid <= params.recon_eval.max_rfid, metadata


def code_usage(root: Path, manifest: dict, params: Params) -> tuple[bool, dict]:
    """Discrete quantizers use enough of their codes (no collapse); continuous ones pass."""
    report = _recon_report(root, manifest)
    usage = report.get("code_usage")
    if usage is None:
        return True, {"quantizer": report.get("quantizer", "?"), "note": "continuous latents: no codes to use"}
    return usage >= params.recon_eval.min_code_usage, {
        "code_usage": usage, "threshold": params.recon_eval.min_code_usage, "quantizer": report.get("quantizer", "?"),
    }
