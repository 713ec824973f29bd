"""Release gates over eval figures ("fid <= 300", "probe_r1 >= 0.2"): read by gen_eval's blocking
Dagster check and by the registry's decision to move `production`."""

from __future__ import annotations

import operator
from typing import Any

from tokenline.config import GATE_PATTERN

_COMPARE = {"<=": operator.le, ">=": operator.ge}


def scalar_figures(report: dict[str, Any]) -> dict[str, float]:
    """A report's top-level numbers (booleans and nested tables left out), as floats: what gates and metrics read."""
    return {key: float(value) for key, value in report.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def parse_gate(gate: str) -> tuple[str, str, float]:
    """'fid <= 250' -> ('fid', '<=', 250.0); anything else is a ValueError naming the gate."""
    match = GATE_PATTERN.match(gate)
    if not match:
        raise ValueError(f"registry gate {gate!r} is not '<metric> <= <number>' or '<metric> >= <number>'")
    return match.group(1), match.group(2), float(match.group(3))


def check_gates(gates: list[str], figures: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(failures, skipped): gates a figure misses, and gates whose figure these figures do not hold."""
    failures, skipped = [], []
    for gate in gates:
        metric, sign, bound = parse_gate(gate)
        value = figures.get(metric)
        if value is None:
            skipped.append(gate)
        elif not _COMPARE[sign](float(value), bound):
            failures.append(f"{metric} = {float(value):.4g}, gate {sign} {bound:g}")
    return failures, skipped
