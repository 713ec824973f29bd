"""Checks on data stage outputs (Dagster asset checks), computed from the stage's report."""

from __future__ import annotations

import json
from pathlib import Path

from tokenline.artifacts import read_jsonl
from tokenline.config import Params
from tokenline.layout import output_path, report_path


def _validate_report(manifest: dict, root: Path) -> dict:

    return json.loads(report_path(root, manifest["dataset"], "validate").read_text())


def counts_add_up(root: Path, manifest: dict, params: Params) -> tuple[bool, dict]:
    """Every image the source offered is either accepted or rejected."""
    report = _validate_report(manifest, root)
    passed = report["total"] == report["accepted"] + report["rejected"] and report["rejected"] == sum(report["reasons"].values())
    return passed, {key: report[key] for key in ("total", "accepted", "rejected")}


def accept_rate(root: Path, manifest: dict, params: Params) -> tuple[bool, dict]:
    """Enough of the dataset survives validation to be worth training on."""
    report = _validate_report(manifest, root)
    return report["accept_rate"] >= params.validate_.min_accept_rate, {
        "accept_rate": report["accept_rate"],
        "threshold": params.validate_.min_accept_rate,
    }


def rejects_have_reasons(root: Path, manifest: dict, params: Params) -> tuple[bool, dict]:
    """The quarantine lists a non-empty reason for every record in it."""
    rows = read_jsonl(output_path(root, manifest["dataset"], "rejects") / "reasons.jsonl")
    missing = [row["key"] for row in rows if not row.get("reason")]
    return not missing, {"quarantined": len(rows), "without_reason": len(missing)}
