"""Benchmarks are one package: `python -m benchmarks` lists each with its summary and runs one by name."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def _benchmarks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_listing_names_every_benchmark_with_its_summary():
    listed = _benchmarks()
    assert listed.returncode == 0
    names = {path.stem for path in (REPO / "benchmarks").glob("*.py")} - {"__init__", "__main__", "common"}
    rows = [line.split(None, 1) for line in listed.stdout.splitlines() if line.startswith("  ")]
    assert {name for name, _ in rows} == names and all(summary.strip() for _, summary in rows)


def test_an_unknown_name_fails_naming_the_known_ones():
    done = _benchmarks("no_such_benchmark")
    assert done.returncode == 2 and "generation_sweeps" in done.stderr


def test_no_benchmark_edits_sys_path():
    """Shared helpers come from benchmarks.common as a package, not through a sys.path insert."""
    offenders = [path.name for path in (REPO / "benchmarks").glob("*.py") if "sys.path" in path.read_text()]
    assert offenders == []
