"""Every path rule of a project: where outputs, training state, reports, plots and previews live.

    data/<dataset>/<output>/            an output folder (models/<dataset>/<output>/ for checkpoints)
    data/<output>/                      a project-scope output (over every dataset)
    models/<dataset>/<stage>.work/      a training stage's resumable state (not an output)
    data/reports/<dataset>/<stage>.json the stage's report (DVC metrics, Dagster metadata)
"""

from __future__ import annotations

from pathlib import Path

# The outputs that are model checkpoints: they live under models/ (the registry checks that the
# stages' `models` fields name exactly these).
MODEL_OUTPUTS = frozenset({"teacher_tokenizer", "tokenizer", "generator", "student", "probe", "onnx", "student_onnx"})


def output_relpath(dataset: str | None, output: str) -> str:
    """An output folder relative to the project root: models/<dataset>/<output> for checkpoints, else data/.

    A project-scope output (dataset None) has no dataset folder: data/<output>.
    """
    area = "models" if output in MODEL_OUTPUTS else "data"
    return f"{area}/{output}" if dataset is None else f"{area}/{dataset}/{output}"


def output_path(root: Path, dataset: str | None, output: str) -> Path:
    """Where an output folder lives."""
    return Path(root) / output_relpath(dataset, output)


def work_path(root: Path, dataset: str, stage: str) -> Path:
    """A stage's resumable scratch folder (training state), beside its checkpoints; not an output."""
    return Path(root) / "models" / dataset / f"{stage}.work"


def report_path(root: Path, dataset: str, stage: str) -> Path:
    """Where a stage's report JSON lives (read by DVC metrics and Dagster)."""
    return Path(root) / "data" / "reports" / dataset / f"{stage}.json"


def samples_path(root: Path, dataset: str | None, stage: str) -> Path:
    """Where a stage's contact sheet PNG lives (data/reports/<stage>.png for a project stage)."""
    folder = Path(root) / "data" / "reports"
    return folder / f"{stage}.png" if dataset is None else folder / dataset / f"{stage}.png"


def plot_relpath(dataset: str, stage: str, plot: str) -> str:
    """A stage's plot data file relative to the project root (a JSON array of rows for `dvc plots`)."""
    return f"data/reports/{dataset}/{stage}_{plot}.json"


def html_relpath(dataset: str | None, stage: str) -> str:
    """A stage's HTML report relative to the project root: data/reports/<stage>.html for the project scope."""
    return f"data/reports/{stage}.html" if dataset is None else f"data/reports/{dataset}/{stage}.html"
