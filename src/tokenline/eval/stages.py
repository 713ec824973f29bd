"""The eval stages of the lineage: `recon_eval` (measure the tokenizer), `probe` (train the text-alignment probe),
`gen_eval` (score a generator) and `report` (the HTML report over every dataset)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tokenline.artifacts import (
    atomic_write_bytes,
    atomic_write_json,
    git_commit,
    read_manifest,
)
from tokenline.contact_sheet import png_bytes
from tokenline.data.shards import iter_shard_samples
from tokenline.eval import checks as eval_checks
from tokenline.eval.clip_score import ClipScorer
from tokenline.eval.compositional import ACCURACIES, score_images
from tokenline.eval.feature_cache import feature_cache_dir
from tokenline.eval.gates import scalar_figures
from tokenline.eval.generation import GenerationMetrics
from tokenline.eval.probe import (
    ProbeConfig,
    load_probe,
    probe_scores,
    save_probe,
    train_probe,
)
from tokenline.eval.probe_previews import retrieval_previews
from tokenline.eval.reconstruction import evaluate_reconstruction
from tokenline.eval.report import DatasetSection, read_grids, render_report, report_row
from tokenline.generator.checkpoint import check_pairing, load_generator
from tokenline.generator.generate import SamplingOptions, generate_images
from tokenline.stage import AssetCheck, PlotSpec, Stage, StageContext, StageResult
from tokenline.text.captions import cached_text_encoder, caption_map
from tokenline.tokenizer.model import Tokenizer1D
from tokenline.tokenizer.pixels import samples_to_batch, tensor_to_image
from tokenline.tokenizer.stages import (
    RECONSTRUCTIONS,
    caption_texts,
    reconstruction_pairs,
)

TRAINING = "training.json"
METRICS = "metrics.json"  # gen_eval's report inside its output folder (the report stage reads it)


def reference_samples(shards: Path, captions_dir: Path, count: int) -> list[dict]:
    """Up to `count` real samples for the eval: the val split first, then train; captions from the captions stage."""
    captions = caption_map(captions_dir)
    samples: list[dict] = []
    for split in ("val", "train"):
        for sample in iter_shard_samples(shards, split):
            if len(samples) >= count:
                return samples
            sample["caption"] = captions.get(sample["key"], sample["caption"])
            samples.append(sample)
    return samples


def reference_samples_split(ctx: StageContext, split: str) -> list[dict]:
    """Every sample of one split, with its caption from the captions stage."""
    captions = caption_map(ctx.inputs["captions"])
    samples = list(iter_shard_samples(ctx.inputs["shards"], split))
    for sample in samples:
        sample["caption"] = captions.get(sample["key"], sample["caption"])
    return samples


# --------------------------------------------------------------------------------------
# probe
# --------------------------------------------------------------------------------------


def probe(ctx: StageContext) -> StageResult:
    """Train the LiT-style alignment probe on the real train images against the frozen caption embeddings."""
    p = ctx.params.probe
    size = ctx.params.data.resolution
    samples = reference_samples_split(ctx, "train")
    images = samples_to_batch(samples, size)
    encoder = cached_text_encoder(ctx.root, ctx.params)
    pooled = encoder.encode([s["caption"] for s in samples]).pooled.float()
    config = ProbeConfig(**({"image_size": size, "text_dim": pooled.shape[-1]} | p.model))
    model, summary = train_probe(images, pooled, config, p.train, log_fn=ctx.tracker.log_metrics)
    out = ctx.outputs["probe"]
    save_probe(model, out)
    held_out = reference_samples_split(ctx, "val")
    scored = held_out if len(held_out) >= 2 else samples
    scores = probe_scores(model, samples_to_batch(scored, size),
                          encoder.encode([s["caption"] for s in scored]).pooled.float(),
                          group=min(p.group, len(scored)))
    atomic_write_json(out / TRAINING, {**summary, "train": p.train.to_dict(), "real_scores": scores,
                                       "scored_split": "val" if scored is held_out else "train"})
    metrics = {"final_loss": float(summary["final_loss"]), "real_probe_score": float(scores["probe_score"]),
               "real_probe_r1": float(scores["probe_r1"])}
    previews = retrieval_previews(model, scored[: ctx.params.tracking.contact_sheet], encoder, ctx.params.data.resolution)
    return StageResult(counts={"images": len(samples), "steps": int(summary["steps"])}, metrics=metrics, samples=previews)


# --------------------------------------------------------------------------------------
# gen_eval
# --------------------------------------------------------------------------------------


def _timed_generation(generator, tokenizer, prompts: list[str], encoder, options) -> tuple[Tensor, float, int]:
    """(images, milliseconds per image, network evaluations per batch) of one sampling setup."""
    started = time.perf_counter()
    rounds = "rounds" if generator.config.objective == "masked" else "steps"
    label = f"gen_eval {options.sampler if rounds == 'steps' else 'masked'} {options.steps} {rounds} g{options.guidance:g}"
    images, nfe = generate_images(generator, tokenizer, prompts, encoder, options, progress=label)
    return images, 1000.0 * (time.perf_counter() - started) / max(1, len(prompts)), nfe


@dataclass
class Subject:
    """What gen_eval scores and against what: the generator, its tokenizer and text encoder, the real images and their captions."""
    generator: Any
    tokenizer: Tokenizer1D
    encoder: Any
    prompts: list[str]
    real: Tensor  # the reference images, [-1, 1]
    base: SamplingOptions  # the profile's sampling setup

    def generate(self, options: SamplingOptions, prompts: list[str] | None = None) -> tuple[Tensor, float, int]:
        """Images for `prompts` (default: the reference captions) with their ms per image and NFE."""
        return _timed_generation(self.generator, self.tokenizer, prompts or self.prompts, self.encoder, options)


def probe_alignment(subject: Subject, images: Tensor, probe_dir: Path, group_size: int) -> tuple[dict, int]:
    """Probe score and R@1 of the generated images, and of the real ones (the ceiling); returns (figures, group)."""
    probe_model = load_probe(probe_dir)
    pooled = subject.encoder.encode(subject.prompts).pooled.float()
    group = min(group_size, len(subject.prompts))
    generated = probe_scores(probe_model, images, pooled, group=group)
    real = probe_scores(probe_model, subject.real, pooled, group=group)
    return {"probe_score": generated["probe_score"], "probe_r1": generated["probe_r1"],
            "probe_score_real": real["probe_score"], "probe_r1_real": real["probe_r1"]}, group


def clip_alignment(subject: Subject, images: Tensor, p, root: Path) -> tuple[dict, str]:
    """CLIPScore of generated and real images with the profile's local OpenCLIP weights; returns (figures, protocol)."""
    weights = p.clip_weights if Path(p.clip_weights).is_absolute() else root / p.clip_weights
    scorer = ClipScorer(p.clip_model, weights, preprocess_tag=p.clip_preprocess)
    figures = scorer.score(images, subject.prompts)
    figures["clip_score_real"] = scorer.score(subject.real, subject.prompts)["clip_score"]
    return figures, scorer.protocol()


def shapes_accuracy(images: Tensor, prompts: list[str]) -> dict:
    """The compositional checker's accuracies (colour, shape, count, position) and their breakdowns."""
    shapes = score_images([tensor_to_image(image) for image in images], prompts)
    figures = {key: shapes[key] for key in ACCURACIES}
    return figures | {f"shapes_{group}": shapes[group] for group in ("by_count", "by_object", "by_relation")}


def sampling_sweeps(subject: Subject, metrics: GenerationMetrics, p, base_figures: dict) -> dict[str, list[dict]]:
    """FID, ms/image and NFE against steps, guidance and (flow) sampler; a repeated setting is measured once."""
    measured: dict[str, dict] = {json.dumps(subject.base.describe()): base_figures}

    def measure(options: SamplingOptions) -> dict:
        key = json.dumps(options.describe())
        if key not in measured:
            swept, ms, nfe = subject.generate(options)
            measured[key] = {"fid": metrics.score(swept)["fid"], "ms_per_image": ms, "nfe": nfe}
        return measured[key]

    base = subject.base
    samplers = p.samplers if subject.generator.config.objective == "flow" else []
    return {
        "steps": [{"steps": steps, **measure(replace(base, steps=steps))} for steps in p.steps_sweep],
        "guidance": [{"guidance": scale, **measure(replace(base, guidance=scale))} for scale in p.guidance_sweep],
        "samplers": [{"sampler": sampler, "steps": base.steps, **measure(replace(base, sampler=sampler))} for sampler in samplers],
    }


def _load_subject(ctx: StageContext) -> tuple[Subject, list[dict], str]:
    """The paired generator and tokenizer, the text encoder and the reference set; also the samples and the tokenizer hash."""
    p = ctx.params.gen_eval
    generator_dir, tokenizer_dir = ctx.inputs["generator"], ctx.inputs["tokenizer"]
    tokenizer_hash = read_manifest(tokenizer_dir)["content_hash"]
    check_pairing(generator_dir, tokenizer_dir, tokenizer_hash)
    tokenizer = Tokenizer1D.from_checkpoint(tokenizer_dir)
    samples = reference_samples(ctx.inputs["shards"], ctx.inputs["captions"], p.samples)
    if len(samples) < 2:
        raise ValueError(f"gen_eval needs at least 2 real images in {ctx.inputs['shards']}, found {len(samples)}")
    subject = Subject(load_generator(generator_dir), tokenizer, cached_text_encoder(ctx.root, ctx.params),
                      [s["caption"] for s in samples], samples_to_batch(samples, tokenizer.config.image_size),
                      SamplingOptions(**ctx.params.generator.sample.model_dump()))
    return subject, samples, tokenizer_hash


def gen_eval(ctx: StageContext) -> StageResult:
    """FID/KID against real images, probe alignment, shapes accuracy and the steps/guidance/sampler sweeps."""
    p = ctx.params.gen_eval
    subject, samples, tokenizer_hash = _load_subject(ctx)
    metrics = GenerationMetrics(subject.real, kid_subset_size=p.kid_subset_size, cache_dir=feature_cache_dir(ctx.root))
    images, ms, nfe = subject.generate(subject.base)
    report: dict[str, Any] = {**metrics.score(images), "ms_per_image": ms, "nfe": nfe}
    alignment, group = probe_alignment(subject, images, ctx.inputs["probe"], p.probe_group)
    report |= alignment
    clip_protocol = None
    if p.clip_weights:
        clip_figures, clip_protocol = clip_alignment(subject, images, p, ctx.root)
        report |= clip_figures
    if ctx.params.dataset(ctx.dataset).source == "shapes":
        report |= shapes_accuracy(images, subject.prompts)
    sweeps = sampling_sweeps(subject, metrics, p, {key: report[key] for key in ("fid", "ms_per_image", "nfe")})
    report["sweeps"] = sweeps
    report["protocol"] = {
        "samples": len(samples), "reference": "val split first, then train; prompts are their captions",
        "objective": subject.generator.config.objective, **subject.base.describe(), "fid": metrics.protocol(),
        "probe": f"LiT probe ({ctx.inputs['probe'].relative_to(ctx.root)}); R@1 among groups of {group}",
        **({"clip_score": clip_protocol} if clip_protocol else {}),
        "ms_per_image": f"wall time of prompt encoding, sampling and decoding in batches of 64 on "
                        f"{'CUDA' if torch.cuda.is_available() else 'CPU'}, {torch.get_num_threads()} threads",
    }
    generator_dir, tokenizer_dir = ctx.inputs["generator"], ctx.inputs["tokenizer"]
    report |= {"generator": str(generator_dir.relative_to(ctx.root)), "generator_hash": read_manifest(generator_dir)["content_hash"],
               "tokenizer": str(tokenizer_dir.relative_to(ctx.root)), "tokenizer_hash": tokenizer_hash}
    sets = {"eval captions": (subject.prompts[: p.grid_images], images[: p.grid_images])}
    for name, set_prompts in p.prompt_sets.items():
        sets[name] = (set_prompts, subject.generate(subject.base, set_prompts)[0])
    report["prompt_sets"] = save_prompt_sets(ctx.outputs["gen_eval"], sets)
    atomic_write_json(ctx.outputs["gen_eval"] / METRICS, report)
    previews = [(tensor_to_image(image), prompt) for image, prompt in zip(images[: ctx.params.tracking.contact_sheet], subject.prompts)]
    numbers = scalar_figures(report)
    plots = {"fid_vs_steps": sweeps["steps"], "fid_vs_guidance": sweeps["guidance"], "ms_vs_steps": sweeps["steps"]}
    return StageResult(counts={"samples": len(samples)}, metrics=numbers, report=report, samples=previews, plots=plots)


def save_prompt_sets(folder, sets: dict[str, tuple[list[str], Tensor]]) -> dict[str, list[dict]]:
    """Write each prompt set's images as PNGs under folder/samples/; returns set name -> [{prompt, file}]."""
    index: dict[str, list[dict]] = {}
    for number, (name, (set_prompts, set_images)) in enumerate(sets.items()):
        index[name] = []
        for position, (prompt, image) in enumerate(zip(set_prompts, set_images)):
            relative = f"samples/set{number}_{position:03d}.png"
            atomic_write_bytes(folder / relative, png_bytes(tensor_to_image(image)))
            index[name].append({"prompt": prompt, "file": relative})
    return index


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def report(ctx: StageContext) -> StageResult:
    """One HTML report over every active dataset from its gen_eval and recon_eval outputs."""
    sections = []
    for name, folders in ctx.dataset_inputs.items():
        gen = json.loads((folders["gen_eval"] / METRICS).read_text())
        recon = json.loads((folders["recon_eval"] / METRICS).read_text())
        student = json.loads((folders["student_eval"] / METRICS).read_text())
        labels = {"student": f"student ({student['method']}, {student['steps']} steps)",
                  "teacher": "teacher, same prompts and seed"}
        prompt_sets = read_grids(gen.get("prompt_sets", {}), folders["gen_eval"])
        prompt_sets |= read_grids(student.get("grids", {}), folders["student_eval"], labels)
        grid = folders["recon_eval"] / RECONSTRUCTIONS
        sections.append(DatasetSection(name, gen, recon, prompt_sets, grid.read_bytes() if grid.is_file() else None,
                                       student))
    html = render_report(sections, ctx.params.report.title, ctx.params.profile, git_commit(ctx.root) or "unknown")
    rows = [report_row(section) for section in sections]
    atomic_write_json(ctx.outputs["report"] / "summary.json", {"rows": rows})
    images = sum(len(items) for section in sections for items in section.prompt_sets.values())
    return StageResult(counts={"datasets": len(sections), "images": images}, html=html)


# --------------------------------------------------------------------------------------
# recon_eval
# --------------------------------------------------------------------------------------


def recon_eval(ctx: StageContext) -> StageResult:
    """PSNR, SSIM, rFID, tokens/bits per image and code usage of the tokenizer on the val split."""
    options = ctx.params.recon_eval
    tokenizer_dir = ctx.inputs["tokenizer"]
    model = Tokenizer1D.from_checkpoint(tokenizer_dir)
    texts = caption_texts(ctx, model.config.text_tokens) if model.config.text_dim else None
    index = read_manifest(ctx.inputs["shards"])["counts"]
    # The val split is the protocol; a dataset too small to have one falls back to train, and says so.
    split = "val" if index.get("val", 0) >= 2 else "train"
    metrics, grid = evaluate_reconstruction(
        model, ctx.inputs["shards"], split=split,
        text_for=(lambda captions: texts.encode(captions)) if texts is not None else None,
        max_samples=options.max_samples, grid=options.grid,
    )
    report = {
        **metrics,
        "tokenizer": str(tokenizer_dir.relative_to(ctx.root)),
        "tokenizer_hash": read_manifest(tokenizer_dir)["content_hash"],
        "quantizer": model.config.quantizer,
        "text_conditioning": bool(model.config.text_dim),
        "protocol": f"{metrics['samples']} {split} images at {model.config.image_size} px; rFID: offline "
        "FID Inception (2048-d pool) of reconstructions vs originals",
    }
    out = ctx.outputs["recon_eval"]
    atomic_write_json(out / "metrics.json", report)
    if grid is not None:
        atomic_write_bytes(out / RECONSTRUCTIONS, png_bytes(grid))
        ctx.tracker.log_image(grid, f"samples/{RECONSTRUCTIONS}")
    samples = reconstruction_pairs(model, ctx, texts, max(1, ctx.params.tracking.contact_sheet // 2))
    numbers = {key: float(value) for key, value in metrics.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)}
    return StageResult(counts={"samples": int(metrics["samples"])}, metrics=numbers, report=report, samples=samples)


# --------------------------------------------------------------------------------------
# The registry entries of this area (pipeline.py lists them)
# --------------------------------------------------------------------------------------

# The tokenizer's own eval: listed in the registry right after the tokenizer stages, as DVC and
# Dagster have always shown it.
TOKENIZER_EVAL_STAGES = (
    Stage(
        name="recon_eval",
        func=recon_eval,  # declared here, where its metrics live; grouped with the tokenizer it measures
        area="tokenizer",
        description="Reconstruction metrics on the val split: PSNR, SSIM, rFID (offline FID "
        "Inception), tokens and bits per image, code usage.",
        inputs=("tokenizer", "shards", "captions"),
        outputs=("recon_eval",),
        code=("text", "eval"),
        params=("tokenizer", "recon_eval"),
        report=True,
        checks=(
            AssetCheck("rfid_below_threshold", "recon_eval", "rFID <= recon_eval.max_rfid", eval_checks.rfid_below_threshold),
            AssetCheck("code_usage", "recon_eval", "code usage >= recon_eval.min_code_usage (discrete quantizers)", eval_checks.code_usage),
        ),
    ),
)

STAGES = (
    Stage(
        name="probe",
        func=probe,
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
        func=gen_eval,
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
            AssetCheck("registry_gates", "gen_eval", "the figures pass registry.gates (blocking: a failing model is "
                       "not exported or registered in the same run)", eval_checks.registry_gates, blocking=True),
        ),
    ),
)

# The cross-dataset report: listed after every per-dataset eval it reads (gen_eval, student_eval).
REPORT_STAGES = (
    Stage(
        name="report",
        func=report,
        area="eval",
        description="One self-contained HTML report over every active dataset (data/reports/report.html): "
        "sample grids per prompt set, the metrics table naming its tokenizer and generator checkpoints, "
        "each student beside its teacher, and plots of FID vs steps, FID vs guidance, ms/image vs steps "
        "and FID vs NFE.",
        inputs=("gen_eval", "recon_eval", "student_eval"),
        outputs=("report",),
        params=("report",),
        scope="project",
        html=True,
    ),
)
