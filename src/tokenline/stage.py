"""The stage types every area declares its stages with: Stage, StageContext, StageResult, AssetCheck, PlotSpec.

A stage function takes a `StageContext`, reads its inputs by path, writes into the (temporary)
output folders it is given, and returns a `StageResult`. The runner handles locks, atomic
renames, manifests, reports, freshness and MLflow; the registry (`pipeline.py`) lists stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from tokenline.config import Params

# Every stage's manifest and DVC entry include these keys: they pick and shape the profile.
ALWAYS_PARAMS = ("profile", "datasets", "active_datasets")

# A stage's scope: "dataset" stages run once per active dataset (DVC matrix, Dagster partitions);
# "project" stages run once over every active dataset's outputs (the cross-dataset report).
SCOPES = ("dataset", "project")


# --------------------------------------------------------------------------------------
# Registry types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AssetCheck:
    """A check on a stage's output, run by Dagster after each materialization."""
    name: str
    output: str  # which of the stage's outputs it checks
    description: str
    func: Callable[[Path, dict, Params], tuple[bool, dict]]  # (root, manifest, params) -> (passed, metadata)
    blocking: bool = False  # Dagster: a failure stops the run's downstream assets


@dataclass(frozen=True)
class PlotSpec:
    """A data-series plot a stage writes: data/reports/<dataset>/<stage>_<name>.json, read by `dvc plots`."""
    name: str
    x: str  # field of each row on the x axis
    y: str  # field on the y axis
    title: str


# The input key of a training stage's start checkpoint (`<section>.init`, Stage.init_from): its
# manifest hash joins the inputs', so a start checkpoint retrained in place makes the stage stale.
INIT = "init"


@dataclass(frozen=True)
class Stage:
    """One step of the lineage: what it reads, writes and depends on."""
    name: str
    func: Callable[["StageContext"], "StageResult"]
    area: str  # folder under src/tokenline/ and the Dagster asset group
    description: str
    inputs: tuple[str, ...] = ()  # names of upstream outputs
    outputs: tuple[str, ...] = ()  # folders data/<dataset>/<output> (models/<dataset>/<output> if in models)
    params: tuple[str, ...] = ()  # top-level params sections the stage reads
    report: bool = False  # writes data/reports/<dataset>/<name>.json (DVC metrics)
    checks: tuple[AssetCheck, ...] = ()
    models: tuple[str, ...] = ()  # the outputs that are model checkpoints: they live under models/
    code: tuple[str, ...] = ()  # source folders under src/tokenline/ it uses beyond its own area (DVC deps)
    plots: tuple[PlotSpec, ...] = ()  # data series it writes for `dvc plots` (rows in StageResult.plots)
    scope: str = "dataset"  # "dataset" or "project" (see SCOPES)
    html: bool = False  # writes an HTML report: data/reports/<name>.html (project) or data/reports/<dataset>/<name>.html
    init_from: str | None = None  # params section whose `init` may name a checkpoint folder to start from (input INIT)
    dvc_artifact: str | None = None  # a DVC artifact type ("model"): its output is declared in dvc.yaml's `artifacts:` per dataset

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"stage {self.name!r}: scope must be one of {SCOPES}, not {self.scope!r}")
        if self.scope == "project" and (self.report or self.plots):
            raise ValueError(f"stage {self.name!r}: metrics and plot files are per dataset; a project stage writes html")

    @property
    def per_dataset(self) -> bool:
        """Whether the stage runs once per dataset (else once for the project)."""
        return self.scope == "dataset"


@dataclass
class StageResult:
    """What a stage returns: counts and metrics for manifests, samples for previews."""
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] | None = None  # written to the stage's report file
    samples: list[tuple[Image.Image, str]] = field(default_factory=list)  # (image, caption)
    plots: dict[str, list[dict]] = field(default_factory=dict)  # PlotSpec name -> rows
    html: str | None = None  # the stage's HTML report (Stage.html)


@dataclass
class StageContext:
    """Everything a stage function may touch: params, its dataset and its paths."""
    stage: Stage
    params: Params
    dataset: str | None  # None for a project-scope stage
    root: Path
    inputs: dict[str, Path]  # output name -> committed upstream folder (dataset-scope stages)
    outputs: dict[str, Path]  # output name -> temporary folder to fill
    tracker: Any = None  # tokenline.tracking StageTracker or NullTracker: live step metrics and images
    resume: bool = False  # continue the stage's interrupted or shorter training run (`--resume`)
    force: bool = False  # with resume: accept a changed training config (`--force`)
    dataset_inputs: dict[str, dict[str, Path]] = field(default_factory=dict)  # project scope: dataset -> inputs

    @property
    def spec(self):
        """The dataset's spec from params."""
        return self.params.dataset(self.dataset)
