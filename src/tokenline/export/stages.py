"""The export stage: the dataset's generator, tokenizer and text encoder as an ONNX pipeline folder.

models/<dataset>/onnx/ holds text_encoder.onnx, generator.onnx, decoder.onnx, tokenizer.json and
pipeline.json (sampling settings, latent statistics, the source checkpoints' content hashes, the
opset and the parity measured here). The stage fails, and nothing is published, when onnxruntime's
images differ from torch's by more than export.max_parity or, on shapes, when the compositional
checker reads any pair of them differently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from tokenline.artifacts import atomic_write_json, read_manifest
from tokenline.eval.compositional import check_image
from tokenline.eval.stages import METRICS
from tokenline.export import checks as export_checks
from tokenline.export.build import export_pipeline, measure_parity, torch_backend
from tokenline.export.registry import gate_figures, register
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
             "shapes_count_acc", "shapes_position_acc", "ms_per_image", "parity_max_abs_diff")


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


def export(ctx: StageContext) -> StageResult:
    """Export the pipeline, measure its parity with torch, refuse to publish it when parity fails."""
    p, sample = ctx.params.export, ctx.params.generator.sample
    generator_dir, tokenizer_dir = ctx.inputs["generator"], ctx.inputs["tokenizer"]
    tokenizer_hash = read_manifest(tokenizer_dir)["content_hash"]
    check_pairing(generator_dir, tokenizer_dir, tokenizer_hash)
    generator, tokenizer = load_generator(generator_dir), Tokenizer1D.from_checkpoint(tokenizer_dir)
    encoder = params_text_encoder(ctx.params)
    sources = {name: read_manifest(ctx.inputs[name])["content_hash"] for name in ("generator", "tokenizer", "gen_eval")}
    options = SamplingOptions(**sample.model_dump())
    folder = ctx.outputs["onnx"]
    published = output_path(ctx.root, ctx.dataset, "onnx")  # `folder` is renamed to this once done
    source_dirs = {name: os.path.relpath(ctx.inputs[name], published) for name in ("generator", "tokenizer")}
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
        raise ValueError(f"export of {ctx.dataset} not published: {'; '.join(problems)}")
    spec["parity"] = figures
    atomic_write_json(folder / PIPELINE_FILE, spec)  # the hashes in `files` cover the graphs, not this file
    samples = [(Image.fromarray(image), prompt or "(empty prompt)") for image, prompt in zip(to_uint8(onnx_images), prompts)]
    metrics = {"parity_max_abs_diff": figures["max_abs_diff"], "torch_ms_per_image": figures["torch_ms_per_image"],
               "onnx_ms_per_image": min(run["ms_per_image"] for run in figures["runs"])}
    return StageResult(counts={"graphs": 3, "parity_prompts": len(prompts)}, metrics=metrics,
                       report={**figures, "opset": p.opset, "sources": sources, "pipeline": str(published.relative_to(ctx.root))},
                       samples=samples)


def lineage_tags(root: Path, folder: Path, params) -> dict[str, str]:
    """Every upstream output's content hash (following the manifests' inputs), the git commit and the profile."""
    manifest = read_manifest(folder)
    tags = {"profile": params.profile, "git_commit": str(manifest.get("git_commit")),
            "hash.onnx": manifest["content_hash"]}
    pending = list(manifest["inputs"].items())
    while pending:
        name, entry = pending.pop()
        if f"hash.{name}" in tags:
            continue
        tags[f"hash.{name}"] = entry["hash"]
        upstream = read_manifest(root / entry["path"]) if (root / entry["path"]).is_dir() else None
        pending += list((upstream or {}).get("inputs", {}).items())
    return tags


def registry(ctx: StageContext) -> StageResult:
    """Register the export as a new version of tokenline-<dataset> (alias candidate) and gate `production`."""
    folder = ctx.inputs["onnx"]
    report = json.loads((ctx.inputs["gen_eval"] / METRICS).read_text())
    figures = gate_figures(report, read_pipeline(folder))
    tags = lineage_tags(ctx.root, folder, ctx.params)
    tags |= {f"eval.{key}": f"{figures[key]:.6g}" for key in EVAL_TAGS if key in figures}
    uri, experiment = project_experiment(ctx.params, ctx.root)
    result = register(folder, ctx.dataset, tags, figures, list(ctx.params.registry.gates), uri, experiment)
    atomic_write_json(ctx.outputs["registry"] / "registry.json", result)
    counts = {"version": result["version"], "production_version": result["production_version"] or 0}
    # The contact sheet: what the registered version draws for the report's named prompts.
    prompts = [prompt for prompts in ctx.params.gen_eval.prompt_sets.values() for prompt in prompts][:SHEET_PROMPTS] or [""]
    images = OnnxPipeline(folder, threads=ctx.params.export.threads or usable_cores()).generate(prompts)
    samples = [(Image.fromarray(image), f"v{result['version']}: {prompt or '(empty prompt)'}") for image, prompt in zip(images, prompts)]
    return StageResult(counts=counts, metrics={"gates_passed": float(result["gates_passed"])}, report=result,
                       samples=samples)


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
)
