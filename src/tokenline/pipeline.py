"""THE stage registry. The CLI, dvc.yaml and the Dagster assets are all built from STAGES.

Adding a stage is one `Stage(...)` entry below plus its function. A stage function takes a
`StageContext`, reads its inputs by path, writes into the (temporary) output folders it is
given, and returns a `StageResult`. The runner handles atomic renames, manifests, reports,
freshness and MLflow.
"""

from __future__ import annotations

import functools
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


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------


def output_relpath(dataset: str | None, output: str) -> str:
    """An output folder relative to the project root: models/<dataset>/<output> for checkpoints, else data/.

    A project-scope output (dataset None) has no dataset folder: data/<output>.
    """
    area = "models" if output in _registry()["MODEL_OUTPUTS"] else "data"
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


# --------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------


def _build_registry() -> list[Stage]:
    # Imported here so `import tokenline.pipeline` stays cheap for tools that only list stages.
    from tokenline.data import checks as data_checks
    from tokenline.data import stages as data_stages
    from tokenline.eval import checks as eval_checks
    from tokenline.eval import stages as eval_stages
    from tokenline.generator import checks as generator_checks
    from tokenline.generator import stages as generator_stages
    from tokenline.tokenizer import checks as tokenizer_checks
    from tokenline.tokenizer import stages as tokenizer_stages

    return [
        Stage(
            name="raw",
            func=data_stages.raw,
            area="data",
            description="Pull the dataset's source into data/<dataset>/raw: image files exactly "
            "as offered, raw caption bytes and a record table.",
            outputs=("raw",),
            params=("data",),
        ),
        Stage(
            name="validate",
            func=data_stages.validate,
            area="data",
            description="Great Expectations suite over the record table: each record accepted "
            "(normalized) or quarantined in data/<dataset>/rejects with its reason.",
            inputs=("raw",),
            outputs=("validated", "rejects"),
            params=("data", "validate"),
            report=True,
            checks=(
                AssetCheck("counts_add_up", "validated", "total = accepted + rejected", data_checks.counts_add_up),
                AssetCheck("accept_rate", "validated", "accepted / total >= validate.min_accept_rate", data_checks.accept_rate),
                AssetCheck("rejects_have_reasons", "rejects", "every quarantined record names a reason", data_checks.rejects_have_reasons),
            ),
        ),
        Stage(
            name="shards",
            func=data_stages.shards,
            area="data",
            description="Webdataset tar shards (image + .txt + .json) with a deterministic "
            "train/val split by key hash.",
            inputs=("validated",),
            outputs=("shards",),
            params=("data", "shards"),
        ),
        Stage(
            name="captions",
            func=data_stages.captions,
            area="data",
            description="Captions keyed by sample key from the configured captioner "
            "(metadata, template or model), with the captioner recorded.",
            inputs=("shards",),
            outputs=("captions",),
            params=("captions",),
        ),
        Stage(
            name="tokenizer",
            func=tokenizer_stages.tokenizer,
            area="tokenizer",
            description="Train the 1D tokenizer (ViT encoder -> K tokens -> quantizer -> ViT decoder) "
            "with accelerate; EMA weights as safetensors + config in models/<dataset>/tokenizer.",
            inputs=("shards", "captions"),
            outputs=("tokenizer",),
            models=("tokenizer",),
            code=("text",),
            params=("data", "tokenizer"),
            init_from="tokenizer",
            checks=(
                AssetCheck("finite_weights", "tokenizer", "every tokenizer weight is finite", tokenizer_checks.finite_weights),
            ),
        ),
        Stage(
            name="tokens",
            func=tokenizer_stages.tokens,
            area="tokenizer",
            description="Token cache: every shard encoded once into memory-mappable latents/codes "
            "plus caption embeddings, keyed by the tokenizer checkpoint's hash.",
            inputs=("tokenizer", "shards", "captions"),
            outputs=("tokens",),
            code=("text",),
            params=("tokenizer", "tokens"),
        ),
        Stage(
            name="recon_eval",
            func=tokenizer_stages.recon_eval,
            area="tokenizer",
            description="Reconstruction metrics on the val split: PSNR, SSIM, rFID (offline FID "
            "Inception), tokens and bits per image, code usage.",
            inputs=("tokenizer", "shards", "captions"),
            outputs=("recon_eval",),
            code=("text", "eval"),
            params=("tokenizer", "recon_eval"),
            report=True,
            checks=(
                AssetCheck("rfid_below_threshold", "recon_eval", "rFID <= recon_eval.max_rfid", tokenizer_checks.rfid_below_threshold),
                AssetCheck("code_usage", "recon_eval", "code usage >= recon_eval.min_code_usage (discrete quantizers)", tokenizer_checks.code_usage),
            ),
        ),
        Stage(
            name="generator",
            func=generator_stages.generator,
            area="generator",
            description="Train the text-to-token generator on the token cache: a flow transformer over "
            "latents (kl, softvq, binary) or a masked transformer over vq codes; EMA weights in "
            "models/<dataset>/generator, sample grid from val captions.",
            inputs=("tokens", "tokenizer"),
            outputs=("generator",),
            models=("generator",),
            code=("tokenizer", "text"),
            params=("generator",),
            init_from="generator",
            checks=(
                AssetCheck("finite_weights", "generator", "every generator weight is finite", generator_checks.finite_weights),
            ),
        ),
        Stage(
            name="probe",
            func=eval_stages.probe,
            area="eval",
            description="Text-alignment probe: a small open_clip ViT trained contrastively against the frozen "
            "caption encoder on the real train images (LiT, text side locked), for probe_score and R@1.",
            inputs=("shards", "captions"),
            outputs=("probe",),
            models=("probe",),
            code=("text", "tokenizer"),
            params=("data", "tokenizer", "probe"),
        ),
        Stage(
            name="gen_eval",
            func=eval_stages.gen_eval,
            area="eval",
            description="Generation eval: FID/KID vs real images (offline FID Inception), probe alignment of "
            "generated vs real images, shapes compositional accuracy, and FID/ms per image vs steps, guidance "
            "and sampler.",
            inputs=("generator", "tokenizer", "probe", "shards", "captions"),
            outputs=("gen_eval",),
            code=("generator", "tokenizer", "text"),
            params=("generator", "gen_eval"),
            report=True,
            plots=(
                PlotSpec("fid_vs_steps", "steps", "fid", "FID vs sampling steps"),
                PlotSpec("fid_vs_guidance", "guidance", "fid", "FID vs guidance scale"),
                PlotSpec("ms_vs_steps", "steps", "ms_per_image", "milliseconds per image vs sampling steps"),
            ),
            checks=(
                AssetCheck("fid_below_threshold", "gen_eval", "FID <= gen_eval.max_fid", eval_checks.fid_below_threshold),
            ),
        ),
        Stage(
            name="report",
            func=eval_stages.report,
            area="eval",
            description="One self-contained HTML report over every active dataset (data/reports/report.html): "
            "sample grids per prompt set, the metrics table naming its tokenizer and generator checkpoints, "
            "and plots of FID vs steps, FID vs guidance and ms/image vs steps.",
            inputs=("gen_eval", "recon_eval"),
            outputs=("report",),
            params=("report",),
            scope="project",
            html=True,
        ),
    ]


REGISTRY_NAMES = ("STAGES", "STAGE_BY_NAME", "PRODUCER", "MODEL_OUTPUTS")


def _check_scopes(stages: list[Stage]) -> None:
    # A dataset-scope stage reads one dataset's folders, so it cannot consume a project output.
    producer = {output: stage for stage in stages for output in stage.outputs}
    for stage in stages:
        for name in stage.inputs:
            if stage.per_dataset and not producer[name].per_dataset:
                raise ValueError(f"stage {stage.name!r} runs per dataset but reads the project output {name!r}")


@functools.cache
def _registry() -> dict[str, Any]:
    stages = _build_registry()
    _check_scopes(stages)
    return {
        "STAGES": stages,
        "STAGE_BY_NAME": {stage.name: stage for stage in stages},
        "PRODUCER": {output: stage for stage in stages for output in stage.outputs},
        "MODEL_OUTPUTS": frozenset(output for stage in stages for output in stage.models),
    }


def __getattr__(name: str) -> Any:
    """STAGES, STAGE_BY_NAME, PRODUCER and MODEL_OUTPUTS, built on first use.

    Lazily, because stage modules import this module's types: building the registry at import
    would import them while they are still half-initialized.
    """
    # Only these names: the import system probes modules for others (__path__) and must not build.
    if name in REGISTRY_NAMES:
        return _registry()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_stage(name: str) -> Stage:
    """The registered stage `name`, or an error listing the known stages."""
    by_name = _registry()["STAGE_BY_NAME"]
    if name not in by_name:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(by_name)}")
    return by_name[name]


def upstream_stages(stage: Stage) -> list[Stage]:
    """The stages producing `stage`'s inputs, directly."""
    producer = _registry()["PRODUCER"]
    return list(dict.fromkeys(producer[name] for name in stage.inputs))


def stage_closure(stage: Stage) -> list[Stage]:
    """`stage` and everything upstream of it, in registry (topological) order."""
    needed = {stage.name}
    frontier = [stage]
    while frontier:
        for parent in upstream_stages(frontier.pop()):
            if parent.name not in needed:
                needed.add(parent.name)
                frontier.append(parent)
    return [s for s in _registry()["STAGES"] if s.name in needed]


def params_keys(stage: Stage) -> list[str]:
    """Every top-level params key a stage depends on."""
    return list(dict.fromkeys((*ALWAYS_PARAMS, *stage.params)))
