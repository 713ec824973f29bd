"""`python -m benchmarks` lists the benchmarks with their first docstring line; `python -m benchmarks NAME [ARGS]` runs one.

Measurements go to benchmarks/RESULTS.md with the command, the commit and the date.
"""

from __future__ import annotations

import ast
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"__init__", "__main__", "common"}


def available() -> dict[str, str]:
    """Benchmark name -> the first line of its docstring."""
    found = {}
    for path in sorted(HERE.glob("*.py")):
        if path.stem not in NOT_BENCHMARKS:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            found[path.stem] = doc.splitlines()[0] if doc else ""
    return found


def main(argv: list[str]) -> int:
    """List the benchmarks, or run the one named with the remaining arguments."""
    benchmarks = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m benchmarks NAME [ARGS]   (NAME --help for its options)\n")
        width = max(map(len, benchmarks))
        for name, summary in benchmarks.items():
            print(f"  {name:<{width}}  {summary}")
        return 0
    name = argv[0]
    if name not in benchmarks:
        print(f"error: no benchmark {name!r}; known: {', '.join(benchmarks)}", file=sys.stderr)
        return 2
    sys.argv = [f"benchmarks/{name}.py", *argv[1:]]
    runpy.run_module(f"benchmarks.{name}", run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
