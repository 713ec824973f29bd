#!/usr/bin/env bash
# The GPU box check (benchmarks/gpu_check.py): export, parity and ms/image on CUDA, bf16 training steps.
# On a machine without CUDA it runs the CPU parts and prints one "skipped:" line per CUDA part.
# Usage: benchmarks/gpu_check.sh [--root DIR] [--profile tiny] [--dataset shapes] [--step-profile cpu] [--steps 10]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m benchmarks gpu_check "$@"
