"""The ship stages: a checkpoint, its tokenizer and text encoder as an ONNX pipeline folder, and its registration.

Two checkpoints ship, each with its own pair of stages (a `Shipment`): the generator (`export`,
`registry`: models/<dataset>/onnx, tokenline-<dataset>) and the distilled student
(`student_export`, `student_registry`: models/<dataset>/student_onnx, tokenline-<dataset>-student).

An export folder holds text_encoder.onnx, generator.onnx, decoder.onnx, tokenizer.json and
pipeline.json (sampling settings, latent statistics, the source checkpoints' content hashes, the
opset and the parity measured here). The stage fails, and nothing is published, when onnxruntime's
images differ from torch's by more than export.max_parity or, on shapes, when the compositional
checker reads any pair of them differently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from tokenline.artifacts import atomic_write_json, read_manifest
from tokenline.distill.checkpoint import load_student
from tokenline.eval.compositional import check_image
from tokenline.eval.stages import METRICS
from tokenline.export import checks as export_checks
from tokenline.export.build import export_pipeline, measure_parity, torch_backend
from tokenline.export.registry import STUDENT_SUFFIX, gate_figures, model_name, register
from tokenline.export.runtime import PIPELINE_FILE, OnnxPipeline, read_pipeline, to_uint8
from tokenline.generator.checkpoint import check_pairing, load_generator
from tokenline.generator.generate import SamplingOptions
from tokenline.layout import output_path
from tokenline.stage import AssetCheck, Stage, StageContext, StageResult
from tokenline.text.captions import params_text_encoder
from tokenline.threads import usable_cores
from tokenline.tokenizer.model import Tokenizer1D
from tokenline.tokenizer.token_cache import TokenCache
from tokenline.tracking import project_experiment

SHEET_PROMPTS = 8  # images in the registry stage's contact sheet

# gen_eval figures copied onto each registered version as tags (the UI's version page shows them).
EVAL_TAGS = ("fid", "kid", "probe_r1", "probe_score", "clip_score", "shapes_color_acc", "shapes_shape_acc",
             "shapes_count_acc", "shapes_position_acc", "ms_per_image", "parity_max_abs_diff",
             "nfe", "teacher_fid", "fid_ratio", "speedup")  # the last four: a student's (student_eval)


@dataclass(frozen=True)
class Shipment:
    """What one export/registry pair ships: the checkpoint, the eval that judged it, and the names it is published under."""

    checkpoint: str  # the output holding the generator checkpoint
    evaluation: str  # the output whose metrics.json the registry gates read
    onnx: str  # the export folder
    registry: str  # the registry stage's record
    model_suffix: str  # registered model tokenline-<dataset><suffix>
    load: Callable[[Any, Path], tuple[object, SamplingOptions]]  # (params, folder) -> (model, its sampling)

    def sampling(self, params, folder: Path) -> tuple[object, SamplingOptions]:
        """(model, the sampling it ships with) for the checkpoint in `folder`."""
        return self.load(params, folder)


def generator_sampling(params, folder: Path) -> tuple[object, SamplingOptions]:
    """A generator and the profile's sampling (generator.sample)."""
    return load_generator(folder), SamplingOptions(**params.generator.sample.model_dump())


def student_sampling(params, folder: Path) -> tuple[object, SamplingOptions]:
    """A student and its card's sampling (its steps and sampler, guidance 1), seeded as the generator's."""
    model, card = load_student(folder)
    return model, card.sampling(seed=params.generator.sample.seed)


GENERATOR = Shipment("generator", "gen_eval", "onnx", "registry", "", generator_sampling)
STUDENT = Shipment("student", "student_eval", "student_onnx", "student_registry", STUDENT_SUFFIX, student_sampling)


def parity_prompts(tokens_dir: Path, count: int) -> list[str]:
    """`count` val captions (train if the val split is empty), the last replaced by an empty prompt."""
    try:
        captions = TokenCache(tokens_dir, "val").captions
    except ValueError:
        captions = []
    captions = captions or TokenCache(tokens_dir, "train").captions
    prompts = list(dict.fromkeys(captions))[: max(0, count - 1)]
    return prompts + [""]  # the null caption's path through the graph is exercised too


def checker_agreement(first, second, prompts: list[str]) -> dict:
    """How many image pairs the shapes checker reads alike (colour, shape, count and position verdicts)."""
    same = sum(check_image(Image.fromarray(a), p) == check_image(Image.fromarray(b), p)
               for a, b, p in zip(first, second, prompts) if p)
    return {"checked": sum(1 for p in prompts if p), "agree": same}


def export_checkpoint(ctx: StageContext, shipment: Shipment) -> StageResult:
    """Export `shipment`'s checkpoint, measure its parity with torch, refuse to publish it when parity fails."""
    p = ctx.params.export
    checkpoint_dir, tokenizer_dir = ctx.inputs[shipment.checkpoint], ctx.inputs["tokenizer"]
    tokenizer_hash = read_manifest(tokenizer_dir)["content_hash"]
    check_pairing(checkpoint_dir, tokenizer_dir, tokenizer_hash)
    generator, options = shipment.sampling(ctx.params, checkpoint_dir)
    tokenizer = Tokenizer1D.from_checkpoint(tokenizer_dir)
    encoder = params_text_encoder(ctx.params)
    # pipeline.json names the checkpoint `generator` whichever it is: `--runtime torch` loads it as one.
    hashes = {name: read_manifest(ctx.inputs[name])["content_hash"] for name in (shipment.checkpoint, "tokenizer", shipment.evaluation)}
    sources = {"generator": hashes[shipment.checkpoint], "tokenizer": hashes["tokenizer"], shipment.evaluation: hashes[shipment.evaluation]}
    folder = ctx.outputs[shipment.onnx]
    published = output_path(ctx.root, ctx.dataset, shipment.onnx)  # `folder` is renamed to this once done
    source_dirs = {"generator": os.path.relpath(checkpoint_dir, published), "tokenizer": os.path.relpath(tokenizer_dir, published)}
    spec = export_pipeline(folder, generator, tokenizer, encoder, options, sources, p.opset, source_dirs)

    prompts = parity_prompts(ctx.inputs["tokens"], p.parity_prompts)
    figures, onnx_images, torch_images = measure_parity(
        folder, torch_backend(generator, tokenizer, encoder), prompts, list(p.parity_batch_sizes),
        threads=p.threads or usable_cores())
    figures["max_parity"] = p.max_parity
    if ctx.params.dataset(ctx.dataset).source == "shapes":
        figures["shapes_checker"] = checker_agreement(to_uint8(onnx_images), to_uint8(torch_images), prompts)
    problems = parity_problems(figures)
    if problems:
        raise ValueError(f"{shipment.onnx} of {ctx.dataset} not published: {'; '.join(problems)}")
    spec["parity"] = figures
    atomic_write_json(folder / PIPELINE_FILE, spec)  # the hashes in `files` cover the graphs, not this file
    samples = [(Image.fromarray(image), prompt or "(empty prompt)") for image, prompt in zip(to_uint8(onnx_images), prompts)]
    metrics = {"parity_max_abs_diff": figures["max_abs_diff"], "torch_ms_per_image": figures["torch_ms_per_image"],
               "onnx_ms_per_image": min(run["ms_per_image"] for run in figures["runs"])}
    return StageResult(counts={"graphs": 3, "parity_prompts": len(prompts)}, metrics=metrics,
                       report={**figures, "opset": p.opset, "sources": sources, "pipeline": str(published.relative_to(ctx.root))},
                       samples=samples)


def export(ctx: StageContext) -> StageResult:
    """Export the generator at the profile's sampling (models/<dataset>/onnx)."""
    return export_checkpoint(ctx, GENERATOR)


def student_export(ctx: StageContext) -> StageResult:
    """Export the distilled student at the steps and sampler on its card (models/<dataset>/student_onnx)."""
    return export_checkpoint(ctx, STUDENT)


def lineage_tags(root: Path, folder: Path, params, output: str = "onnx") -> dict[str, str]:
    """Every upstream output's content hash (following the manifests' inputs), the git commit and the profile."""
    manifest = read_manifest(folder)
    tags = {"profile": params.profile, "git_commit": str(manifest.get("git_commit")),
            f"hash.{output}": manifest["content_hash"]}
    pending = list(manifest["inputs"].items())
    while pending:
        name, entry = pending.pop()
        if f"hash.{name}" in tags:
            continue
        tags[f"hash.{name}"] = entry["hash"]
        upstream = read_manifest(root / entry["path"]) if (root / entry["path"]).is_dir() else None
        pending += list((upstream or {}).get("inputs", {}).items())
    return tags


def register_export(ctx: StageContext, shipment: Shipment) -> StageResult:
    """Register `shipment`'s export as a new version (alias candidate) and gate `production` on its eval."""
    folder = ctx.inputs[shipment.onnx]
    report = json.loads((ctx.inputs[shipment.evaluation] / METRICS).read_text())
    figures = gate_figures(report, read_pipeline(folder))
    tags = lineage_tags(ctx.root, folder, ctx.params, shipment.onnx)
    tags |= {f"eval.{key}": f"{figures[key]:.6g}" for key in EVAL_TAGS if key in figures}
    uri, experiment = project_experiment(ctx.params, ctx.root)
    name = model_name(ctx.dataset, shipment.model_suffix)
    result = register(folder, name, ctx.dataset, tags, figures, list(ctx.params.registry.gates), uri, experiment)
    atomic_write_json(ctx.outputs[shipment.registry] / "registry.json", result)
    counts = {"version": result["version"], "production_version": result["production_version"] or 0}
    # The contact sheet: what the registered version draws for the report's named prompts.
    prompts = [prompt for prompts in ctx.params.gen_eval.prompt_sets.values() for prompt in prompts][:SHEET_PROMPTS] or [""]
    images = OnnxPipeline(folder, threads=ctx.params.export.threads or usable_cores()).generate(prompts)
    samples = [(Image.fromarray(image), f"v{result['version']}: {prompt or '(empty prompt)'}") for image, prompt in zip(images, prompts)]
    return StageResult(counts=counts, metrics={"gates_passed": float(result["gates_passed"])}, report=result,
                       samples=samples)


def registry(ctx: StageContext) -> StageResult:
    """Register the generator's export as a version of tokenline-<dataset>."""
    return register_export(ctx, GENERATOR)


def student_registry(ctx: StageContext) -> StageResult:
    """Register the student's export as a version of tokenline-<dataset>-student."""
    return register_export(ctx, STUDENT)


def parity_problems(figures: dict) -> list[str]:
    """Why an export's parity figures fail (empty when they pass)."""
    problems = []
    if figures["max_abs_diff"] > figures["max_parity"]:
        problems.append(f"onnxruntime and torch images differ by up to {figures['max_abs_diff']:.2e} "
                        f"(export.max_parity {figures['max_parity']:.0e})")
    checker = figures.get("shapes_checker")
    if checker and checker["agree"] != checker["checked"]:
        problems.append(f"the shapes checker reads {checker['checked'] - checker['agree']} of "
                        f"{checker['checked']} image pairs differently")
    return problems


# --------------------------------------------------------------------------------------
# The registry entries of this area (pipeline.py lists them)
# --------------------------------------------------------------------------------------

STAGES = (
    Stage(
        name="export",
        func=export,
        area="export",
        description="Export the evaluated generator, its tokenizer's decoder and the MiniLM text encoder "
        "as ONNX graphs plus pipeline.json (models/<dataset>/onnx), runnable with numpy and onnxruntime "
        "alone; fails unless onnxruntime's images match torch's within export.max_parity.",
        inputs=("generator", "tokenizer", "tokens", "gen_eval"),
        outputs=("onnx",),
        models=("onnx",),
        code=("generator", "tokenizer", "text", "eval"),
        params=("generator", "export"),
        report=True,
        dvc_artifact="model",
        checks=(
            AssetCheck("files_match", "onnx", "every file pipeline.json lists is present with its sha256",
                       export_checks.files_match),
        ),
    ),
    Stage(
        name="student_export",
        func=student_export,
        area="export",
        description="Export the distilled student like the generator, at the steps and sampler on its card "
        "(models/<dataset>/student_onnx); fails unless onnxruntime's images match torch's within export.max_parity.",
        inputs=("student", "tokenizer", "tokens", "student_eval"),
        outputs=("student_onnx",),
        models=("student_onnx",),
        code=("generator", "tokenizer", "text", "eval", "distill"),
        params=("student", "generator", "export"),
        report=True,
        dvc_artifact="model",
        checks=(
            AssetCheck("files_match", "student_onnx", "every file pipeline.json lists is present with its sha256",
                       export_checks.student_files_match),
        ),
    ),
    Stage(
        name="registry",
        func=registry,
        area="export",
        description="Register the ONNX pipeline in the MLflow model registry as a pyfunc version of "
        "tokenline-<dataset> with its lineage as tags; alias candidate, and production only when the "
        "gen_eval figures pass registry.gates (data/<dataset>/registry/registry.json says which).",
        inputs=("onnx", "gen_eval"),
        outputs=("registry",),
        code=("eval",),
        params=("registry",),
        report=True,
    ),
    Stage(
        name="student_registry",
        func=student_registry,
        area="export",
        description="Register the student's ONNX pipeline as a version of tokenline-<dataset>-student, gated by "
        "registry.gates on the student_eval figures (fid, fid_ratio, speedup, ...); alias candidate, production when they pass.",
        inputs=("student_onnx", "student_eval"),
        outputs=("student_registry",),
        code=("eval",),
        params=("registry",),
        report=True,
    ),
)
