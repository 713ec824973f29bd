"""The params schema: every section of params.yaml as a typed, validated model (loading: `params_loading`)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)

from tokenline.train_config import GeneratorTrainConfig, ProbeTrainConfig, TrainConfig

SOURCE_SCHEMES = ("openmoji", "shapes", "imagefolder", "webdataset", "coco")

# A dataset name becomes a folder under data/ and models/: the record-key pattern, so never a path.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")


class ConfigError(ValueError):
    """Params that fail validation; the message names the offending key."""


def only_keys(section: str, value: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    """`value` when each of its keys is in `allowed`; else a ValueError naming `section.key` and what is allowed."""
    for key in value:
        if key not in allowed:
            raise ValueError(f"{section}.{key} is not settable; allowed: {', '.join(sorted(allowed))}")
    return value


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetSpec(Section):
    """One named dataset: where its records come from and source options."""

    source: str
    size: int | None = Field(None, gt=0)  # shapes: number of images
    seed: int = 0
    license: str | None = None  # for sources whose records carry none

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme, _, arg = value.partition(":")
        if scheme not in SOURCE_SCHEMES:
            raise ValueError(f"unknown source {scheme!r}; expected one of {', '.join(SOURCE_SCHEMES)}")
        if scheme in ("imagefolder", "webdataset", "coco") and not arg:
            raise ValueError(f"source {scheme!r} needs an argument: {scheme}:...")
        if scheme == "coco" and "," not in arg:
            raise ValueError("coco source is coco:ANNOTATIONS_JSON,IMAGE_DIR")
        if scheme == "shapes" and arg not in ("", "twins"):
            raise ValueError(f"shapes source is `shapes` or `shapes:twins`, not {value!r}")
        return value


class DataParams(Section):
    """Image size and record limit shared by every data stage."""

    resolution: int = Field(64, ge=8, le=2048)
    limit: int | None = Field(None, gt=0)


class ValidateParams(Section):
    """Bounds of the validation suite."""

    min_side: int = Field(16, ge=1)
    max_side: int = Field(16384, ge=1)
    max_aspect: float = Field(4.0, ge=1.0)
    max_caption_chars: int = Field(1000, ge=1)
    require_caption: bool = True
    min_accept_rate: float = Field(0.5, ge=0.0, le=1.0)


class ShardParams(Section):
    """Webdataset shard size and the deterministic train/val split."""

    samples_per_shard: int = Field(1000, ge=1)
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)


class CaptionParams(Section):
    """Which captioner writes the captions, and its options."""

    captioner: Literal["metadata", "template", "model"] = "metadata"
    template: str = "{caption}"
    model: str | None = None
    max_new_tokens: int = Field(30, ge=1)

    @model_validator(mode="after")
    def _model_needs_path(self) -> "CaptionParams":
        if self.captioner == "model" and not self.model:
            raise ValueError("captioner 'model' needs captions.model (a local path or hub name)")
        return self


# The quantizers of tokenline.tokenizer.quantizers (a test keeps the two lists equal); named
# here so a wrong name fails at params validation, before torch is even imported.
QUANTIZER_NAMES = ("vq", "softvq", "binary", "kl")


class TokenizerParams(Section):
    """The 1D tokenizer: size, tokens, quantizer, text conditioning and training."""

    size: Literal["T", "S", "B"] = "S"  # a named size of tokenline.tokenizer.model (TOKENIZER_SIZES)
    num_tokens: Literal[16, 32, 64, 128] = 32  # K, latent tokens per image
    quantizer: Literal[QUANTIZER_NAMES] = "vq"  # type: ignore[valid-type]
    model: dict[str, Any] = {}  # further TokenizerConfig fields (token_dim, codebook_size, width, ...)
    text_conditioning: bool = False  # TexTok: caption tokens enter encoder and decoder
    text_encoder: Literal["minilm", "openclip"] = "minilm"
    text_encoder_path: str | None = None  # openclip: local weights file (never downloaded)
    text_tokens: int = Field(32, ge=1, le=256)  # caption tokens kept per caption
    init: str | None = None  # a tokenizer stage output folder whose weights training starts from
    train: TrainConfig = TrainConfig()

    @field_validator("model")
    @classmethod
    def _no_reserved_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        # These come from elsewhere in params; two places to set one value is a trap.
        reserved = {"image_size": "data.resolution", "num_tokens": "tokenizer.num_tokens",
                    "quantizer": "tokenizer.quantizer", "text_dim": "tokenizer.text_conditioning",
                    "text_tokens": "tokenizer.text_tokens"}
        for key in value:
            if key in reserved:
                raise ValueError(f"set {key} through {reserved[key]}, not tokenizer.model.{key}")
        return value


class TeacherTokenizerParams(Section):
    """The grid teacher of two-stage training: a `layout: grid` tokenizer, one latent per patch."""

    size: Literal["T", "S", "B"] = "S"  # a named size of tokenline.tokenizer.model
    quantizer: Literal[QUANTIZER_NAMES] = "kl"  # type: ignore[valid-type]
    model: dict[str, Any] = {}  # further TokenizerConfig fields (token_dim, patch_size, width, ...)
    train: TrainConfig = TrainConfig()

    @field_validator("model")
    @classmethod
    def _grid_only(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("layout", "grid") != "grid":
            raise ValueError(f"layout must be 'grid' for a teacher (one latent per patch), not {value['layout']!r}")
        reserved = {"image_size": "data.resolution", "quantizer": "teacher_tokenizer.quantizer",
                    "num_tokens": "the grid (data.resolution / patch_size, squared)", "text_dim": "nothing (a teacher reads pixels only)"}
        for key in value:
            if key in reserved:
                raise ValueError(f"{key} is set by {reserved[key]}, not teacher_tokenizer.model.{key}")
        return value

    @field_validator("train")
    @classmethod
    def _no_proxy(cls, value: TrainConfig) -> TrainConfig:
        if value.proxy_steps:
            raise ValueError("proxy_steps must be 0 for the teacher: it is the one trained on pixels")
        return value


class TokensParams(Section):
    """The token cache: encoding batch size."""

    batch_size: int = Field(64, ge=1)


class ReconEvalParams(Section):
    """Reconstruction metrics on the val split, and the asset-check thresholds."""

    max_samples: int | None = Field(None, gt=0)  # at most this many val images (null: all)
    grid: int = Field(8, ge=1, le=64)  # originals/reconstructions pairs in the preview grid
    max_rfid: float = Field(150.0, gt=0)  # Dagster check: rFID at most this
    min_code_usage: float = Field(0.05, ge=0.0, le=1.0)  # Dagster check, discrete quantizers only


class SamplingParams(Section):
    """How generators sample: the sampler family, its steps, guidance and temperature."""

    sampler: Literal["euler", "heun", "euler_maruyama", "time_shift", "consistency"] = "euler"  # flow generators
    steps: int = Field(25, ge=1, le=1000)  # flow: integration steps; masked: decoding rounds
    guidance: float = Field(1.0, ge=0.0)  # classifier-free guidance scale; 1: conditional only
    guidance_interval: tuple[float, float] | None = None  # flow: guide only while t is in (low, high]
    temperature: float = Field(1.0, gt=0.0)  # masked: softmax temperature of sampled codes
    seed: int = 0


class GeneratorParams(Section):
    """The text-to-token generator: objective, size, caption input, training and sampling."""

    objective: Literal["auto", "flow", "masked"] = "auto"  # auto: masked for vq codes, flow otherwise
    size: Literal["T", "S", "B"] = "S"  # a named size of tokenline.generator.model (SIZE_DEFAULTS)
    text_mode: Literal["cross", "context"] = "cross"  # cross-attention, or caption tokens in context
    model: dict[str, Any] = {}  # further GeneratorConfig fields (width, depth, heads, mlp_ratio, text_refiner)
    init: str | None = None  # a generator stage output folder whose weights (and latent statistics) training starts from
    train: GeneratorTrainConfig = GeneratorTrainConfig()
    sample: SamplingParams = SamplingParams()
    preview_prompts: list[str] = []  # extra prompts for the stage's sample grid (besides val captions)

    @field_validator("model")
    @classmethod
    def _only_architecture(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Everything else comes from the token cache (K, D, codebook, text widths) or from above.
        return only_keys("generator.model", value, {"width", "depth", "heads", "mlp_ratio", "text_refiner"})


class ReflowParams(Section):
    """`student.method: reflow`: 2-rectified flow on teacher pairs (rfpp's recipe), then one-step distillation at t = 1."""

    time_a: float = Field(4.0, ge=0.0)  # U-shaped timesteps: p(t) ∝ e^{a t} + e^{a (1 - t)} (rfpp: a = 4); 0: uniform
    distill_share: float = Field(0.3, ge=0.0, lt=1.0)  # the last share of student.train.steps trains at t = 1 only (reflow_distill)


class ConsistencyParams(Section):
    """`student.method: consistency`: consistency distillation from the teacher's ODE with iCT's schedule and loss."""

    p_mean: float = -1.1  # lognormal noise levels (iCT), over the discretized sigmas
    p_std: float = Field(2.0, gt=0.0)
    sigma_min: float = Field(0.002, gt=0.0)  # EDM noise levels, mapped to flow time t = sigma / (1 + sigma)
    sigma_max: float = Field(80.0, gt=0.0)
    rho: float = Field(7.0, gt=0.0)
    s0: int = Field(10, ge=1)  # curriculum N(k) = min(s0 * 2^floor(k / K'), s1) + 1
    s1: int = Field(1280, ge=1)


class DmdParams(Section):
    """`student.method: dmd`: DMD2's distribution matching with a fake-score critic and a GAN head."""

    critic_steps: int = Field(5, ge=1)  # critic updates per student update (two time scales)
    critic_lr: float | None = Field(None, gt=0.0)  # null: student.train.lr
    gan_weight: float = Field(3e-3, ge=0.0)  # the student's GAN term softplus(-D(x_t))
    critic_gan_weight: float = Field(1e-2, ge=0.0)  # the critic's real-vs-fake term
    min_t: float = Field(0.02, gt=0.0, lt=1.0)  # the noise levels the scores are read at: t uniform in [min_t, max_t]
    max_t: float = Field(0.98, gt=0.0, le=1.0)


class StudentWatchParams(Section):
    """The student's FID along training: its EMA weights sample fixed val prompts and noise every `every` steps."""

    every: int = Field(100, ge=0)  # steps between readings, and one at the end (0: off)
    samples: int = Field(100, ge=2)  # generated images, scored against as many real ones (val split first)


class StudentParams(Section):
    """The distilled student (stage `student`): the method, its sampling steps, and how it trains from the teacher."""

    method: Literal["auto", "reflow", "consistency", "dmd", "mask_distill"] = "auto"  # auto: reflow for a flow generator, mask_distill for a masked one
    steps: int = Field(1, ge=1, le=64)  # the student's sampling steps (flow) or decoding rounds (masked)
    teacher_steps: int | None = Field(None, ge=1, le=1000)  # the teacher's steps for pairs and ODE targets (null: generator.sample.steps)
    guidance: float | None = Field(None, ge=0.0)  # the teacher's CFG scale the student learns (null: generator.sample.guidance)
    pairs: int = Field(2000, ge=1)  # reflow, mask_distill: teacher samples in the pair cache
    huber_c: float = Field(0.00054, gt=0.0)  # pseudo-Huber c = huber_c * sqrt(tokens * width) (iCT, rfpp)
    eval_steps: list[Annotated[StrictInt, Field(ge=1, le=64)]] = [1, 2, 4]  # student_eval: FID vs the student's steps
    train: GeneratorTrainConfig = GeneratorTrainConfig(steps=1000, lr=1e-4, warmup_steps=50, caption_dropout=0.0)
    reflow: ReflowParams = ReflowParams()
    consistency: ConsistencyParams = ConsistencyParams()
    dmd: DmdParams = DmdParams()
    watch: StudentWatchParams = StudentWatchParams()


class ProbeParams(Section):
    """The text-alignment probe (LiT, text side locked): image tower size and training."""

    model: dict[str, Any] = {}  # ProbeConfig fields: width, layers, heads, patch_size, embed_dim
    train: ProbeTrainConfig = ProbeTrainConfig()
    group: int = Field(100, ge=2)  # caption retrieval R@1 among this many captions

    @field_validator("model")
    @classmethod
    def _only_architecture(cls, value: dict[str, Any]) -> dict[str, Any]:
        # image_size and text_dim come from data.resolution and the text encoder.
        return only_keys("probe.model", value, {"width", "layers", "heads", "patch_size", "embed_dim"})


class GenEvalParams(Section):
    """Generation eval: sample count, the sweeps behind the report's plots, and the FID check."""

    samples: int = Field(500, ge=2)  # generated images = real reference images (val first, then train)
    kid_subset_size: int = Field(100, ge=2)  # KID subset size (capped by the sample count)
    probe_group: int = Field(100, ge=2)  # R@1 among this many captions
    steps_sweep: list[Annotated[StrictInt, Field(ge=1, le=1000)]] = [1, 4, 8, 25]  # FID and ms/image vs sampling steps
    guidance_sweep: list[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]] = [1.0, 3.0]  # FID vs guidance scale
    samplers: list[Literal["euler", "heun", "euler_maruyama", "time_shift", "consistency"]] = ["euler", "heun", "euler_maruyama", "time_shift"]
    max_fid: float = Field(300.0, gt=0)  # Dagster check: FID at most this
    grid_images: int = Field(16, ge=1, le=256)  # eval captions drawn in the report's sample grid
    prompt_sets: dict[str, list[str]] = {}  # further named prompt sets drawn for the report's sample grids
    clip_model: str = "ViT-B-32"  # open_clip architecture of clip_weights
    clip_weights: str | None = None  # local OpenCLIP weights file: adds clip_score (none is downloaded)
    clip_preprocess: str | None = None  # open_clip pretrained tag whose image mean/std the weights expect

    @field_validator("prompt_sets")
    @classmethod
    def _named_sets(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, prompts in value.items():
            if not prompts:
                raise ValueError(f"gen_eval.prompt_sets.{name} is empty; give it at least one prompt or drop it")
        return value


class ExportParams(Section):
    """The ONNX export: opset, and the parity check of onnxruntime against torch on the same prompts and noise."""

    opset: int = Field(18, ge=17, le=23)  # ONNX opset of the three graphs
    parity_prompts: int = Field(8, ge=1, le=256)  # val captions (the last one replaced by an empty prompt) generated both ways
    parity_batch_sizes: list[Annotated[StrictInt, Field(ge=1, le=256)]] = [1, 7]  # onnxruntime batch sizes checked
    max_parity: float = Field(1e-3, gt=0)  # largest |torch - onnxruntime| pixel difference in [0, 1] accepted
    threads: int | None = Field(None, ge=1)  # onnxruntime intra-op threads (null: the cores this process may use)


# A registry gate: "<metric> <= <number>" or "<metric> >= <number>".
GATE_PATTERN = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


class RegistryParams(Section):
    """The MLflow model registry: the gates a new version passes before `production` moves to it."""

    gates: list[str] = []  # "<metric> <= <number>" or ">=": gen_eval figures and parity_max_abs_diff; a figure a dataset lacks is skipped

    @field_validator("gates")
    @classmethod
    def _well_formed(cls, value: list[str]) -> list[str]:
        for gate in value:
            if not GATE_PATTERN.match(gate):
                raise ValueError(f"registry gate {gate!r} is not '<metric> <= <number>' or '<metric> >= <number>'")
        return value


class NightlyParams(Section):
    """The nightly re-evaluation of each dataset's `production` model (`tokenline nightly`, Dagster schedule `nightly_eval`)."""

    samples: int = Field(64, ge=2)  # generated images = real eval images (val split first, then train)
    seed: int = 0  # image i draws its noise from (seed, i): nights differ only by model and data
    kid_subset_size: int = Field(50, ge=2)
    max_regression: float = Field(0.05, ge=0.0)  # flag a figure worse than last night's by more than this fraction


class ReportParams(Section):
    """The cross-dataset HTML report."""

    title: str = "tokenline generation report"


class TrackingParams(Section):
    """MLflow tracking switches."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "tokenline"
    contact_sheet: int = Field(64, ge=1, le=1024)


class Params(Section):
    """The resolved params of one profile."""

    profile: str
    datasets: dict[str, DatasetSpec]
    active_datasets: list[str]
    data: DataParams = DataParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    shards: ShardParams = ShardParams()
    captions: CaptionParams = CaptionParams()
    tracking: TrackingParams = TrackingParams()
    teacher_tokenizer: TeacherTokenizerParams = TeacherTokenizerParams()
    tokenizer: TokenizerParams = TokenizerParams()
    tokens: TokensParams = TokensParams()
    recon_eval: ReconEvalParams = ReconEvalParams()
    generator: GeneratorParams = GeneratorParams()
    student: StudentParams = StudentParams()
    probe: ProbeParams = ProbeParams()
    gen_eval: GenEvalParams = GenEvalParams()
    export: ExportParams = ExportParams()
    registry: RegistryParams = RegistryParams()
    nightly: NightlyParams = NightlyParams()
    report: ReportParams = ReportParams()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("datasets")
    @classmethod
    def _names_are_names(cls, value: dict[str, DatasetSpec]) -> dict[str, DatasetSpec]:
        for name in value:
            check_dataset_name(name)
        return value

    @model_validator(mode="after")
    def _active_are_defined(self) -> "Params":
        for name in self.active_datasets:
            if name not in self.datasets:
                raise ValueError(f"active_datasets names {name!r}, which datasets does not define")
        # Whether sizes, patch and width fit together is the areas' knowledge: runner.check_params.
        return self

    def dataset(self, name: str) -> DatasetSpec:
        """The spec of dataset `name`, or an error listing the known ones."""
        if name not in self.datasets:
            raise ConfigError(unknown_dataset_message(name, self.datasets))
        return self.datasets[name]

    def section(self, key: str) -> Any:
        """The plain-data value of a top-level params key, as stored in manifests (QUIET_DEFAULTS left out)."""
        dumped = self.model_dump(mode="json", by_alias=True)
        for path, default in QUIET_DEFAULTS.items():
            if path[0] != key:
                continue
            parent = dumped
            for name in path[:-1]:
                parent = parent[name]
            if parent.get(path[-1]) == default:
                del parent[path[-1]]
        return dumped[key]

    def slice_hash(self, keys: list[str], dataset: str | None) -> str:
        """Hash of the params a stage depends on, for staleness checks (dataset None: every active dataset).

        A per-dataset stage's hash reads its own dataset's spec, not the others' nor which datasets are
        active: `tokenline run STAGE --dataset D` (what DVC calls) and `run all` then agree on freshness.
        """
        per_dataset = dataset is not None
        sliced = {key: self.section(key) for key in keys if not (per_dataset and key in ("datasets", "active_datasets"))}
        if dataset is None:
            sliced["dataset"] = {name: self.datasets[name].model_dump(mode="json") for name in self.active_datasets}
        else:
            sliced["dataset"] = self.datasets[dataset].model_dump(mode="json")
        blob = json.dumps(sliced, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Params added after lineages were trained with them at this value: left out of the stage slices
# (and so of staleness hashes) while at it, so adding them leaves every existing output fresh,
# as TokenizerConfig.to_dict leaves out layout "1d".
QUIET_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("tokenizer", "train", "freeze_encoder"): False,
    ("tokenizer", "train", "proxy_steps"): 0,
    ("tokenizer", "train", "latent_noise"): 0.0,
    ("tokenizer", "init"): None,
    ("generator", "init"): None,
    ("generator", "train", "swap_weight"): 0.0,
    ("generator", "train", "swap_temperature"): 0.02,
    ("generator", "train", "swap_min_t"): 0.5,
}


def check_dataset_name(name: str) -> str:
    """`name` if it is a dataset name (letters, digits, `_`, `-`), else a ConfigError saying so."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(f"dataset name {name!r} must match {NAME_PATTERN.pattern} (letters, digits, _ and -): "
                          "it names folders under data/ and models/, never a path")
    return name


def unknown_dataset_message(name: str, known: dict) -> str:
    """The one-line error for a dataset name params do not define."""
    return (
        f"dataset {name!r} is not defined (known: {', '.join(sorted(known))}); define it in "
        f"params.yaml or with --set datasets.{name}.source=..."
    )
