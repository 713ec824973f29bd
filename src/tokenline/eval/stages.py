"""The eval stages of the lineage: `probe` (train the text-alignment probe) and `gen_eval` (score a generator)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokenline.artifacts import atomic_write_bytes, atomic_write_json, read_manifest
from tokenline.data.stages import iter_shard_samples
from tokenline.pipeline import StageContext, StageResult
from tokenline.tokenizer.caption_text import cached_text_encoder, caption_map
from tokenline.tokenizer.pixels import samples_to_batch, tensor_to_image

TRAINING = "training.json"
METRICS = "metrics.json"  # gen_eval's report inside its output folder (the report stage reads it)


def reference_samples(ctx: StageContext, count: int) -> list[dict]:
    """Up to `count` real samples for the eval: the val split first, then train; captions from the captions stage."""
    captions = caption_map(ctx.inputs["captions"])
    samples: list[dict] = []
    for split in ("val", "train"):
        for sample in iter_shard_samples(ctx.inputs["shards"], split):
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
    from tokenline.eval.probe import ProbeConfig, probe_scores, save_probe, train_probe

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


@torch.no_grad()
def retrieval_previews(model, samples: list[dict], encoder, size: int) -> list[tuple]:
    """(image, the caption the probe ranks first among these samples' captions) for the contact sheet."""
    if not samples:
        return []
    captions = [s["caption"] for s in samples]
    images = model.encode_images(samples_to_batch(samples, size))
    texts = model.encode_texts(encoder.encode(captions).pooled.float())
    best = (images @ texts.T).argmax(dim=1).tolist()
    return [(s["image"], ("= " if captions[b] == s["caption"] else "≠ ") + captions[b]) for s, b in zip(samples, best)]


# --------------------------------------------------------------------------------------
# gen_eval
# --------------------------------------------------------------------------------------


def _timed_generation(generator, tokenizer, prompts: list[str], encoder, options) -> tuple[Tensor, float, int]:
    """(images, milliseconds per image, network evaluations per batch) of one sampling setup."""
    from tokenline.generator.generate import generate_images

    started = time.perf_counter()
    images, nfe = generate_images(generator, tokenizer, prompts, encoder, options)
    return images, 1000.0 * (time.perf_counter() - started) / max(1, len(prompts)), nfe


def gen_eval(ctx: StageContext) -> StageResult:
    """FID/KID against real images, probe alignment, shapes accuracy and the steps/guidance/sampler sweeps."""
    from dataclasses import replace

    from tokenline.eval.generation import GenerationMetrics
    from tokenline.eval.probe import load_probe, probe_scores
    from tokenline.generator.checkpoint import check_pairing, load_generator
    from tokenline.generator.generate import SamplingOptions, generate_images
    from tokenline.tokenizer.model import Tokenizer1D

    p = ctx.params.gen_eval
    generator_dir, tokenizer_dir = ctx.inputs["generator"], ctx.inputs["tokenizer"]
    tokenizer_hash = read_manifest(tokenizer_dir)["content_hash"]
    check_pairing(generator_dir, tokenizer_dir, tokenizer_hash)
    generator = load_generator(generator_dir)
    tokenizer = Tokenizer1D.from_checkpoint(tokenizer_dir)
    encoder = cached_text_encoder(ctx.root, ctx.params)
    samples = reference_samples(ctx, p.samples)
    if len(samples) < 2:
        raise ValueError(f"gen_eval needs at least 2 real images in {ctx.inputs['shards']}, found {len(samples)}")
    prompts = [s["caption"] for s in samples]
    real = samples_to_batch(samples, tokenizer.config.image_size)
    metrics = GenerationMetrics(real, kid_subset_size=p.kid_subset_size)
    base = SamplingOptions(**ctx.params.generator.sample.model_dump())

    images, ms, nfe = _timed_generation(generator, tokenizer, prompts, encoder, base)
    report: dict[str, Any] = {**metrics.score(images), "ms_per_image": ms, "nfe": nfe}

    probe_model = load_probe(ctx.inputs["probe"])
    pooled = encoder.encode(prompts).pooled.float()
    group = min(p.probe_group, len(samples))
    generated_scores = probe_scores(probe_model, images, pooled, group=group)
    real_scores = probe_scores(probe_model, real, pooled, group=group)
    report |= {"probe_score": generated_scores["probe_score"], "probe_r1": generated_scores["probe_r1"],
               "probe_score_real": real_scores["probe_score"], "probe_r1_real": real_scores["probe_r1"]}

    if p.clip_weights:
        from tokenline.eval.clip_score import ClipScorer

        weights = p.clip_weights if Path(p.clip_weights).is_absolute() else ctx.root / p.clip_weights
        scorer = ClipScorer(p.clip_model, weights, preprocess_tag=p.clip_preprocess)
        report |= scorer.score(images, prompts)
        report["clip_score_real"] = scorer.score(real, prompts)["clip_score"]
        clip_protocol = scorer.protocol()

    if ctx.params.dataset(ctx.dataset).source == "shapes":
        from tokenline.eval.compositional import score_images

        shapes = score_images([tensor_to_image(image) for image in images], prompts)
        report |= {key: shapes[key] for key in ("shapes_color_acc", "shapes_shape_acc", "shapes_count_acc", "shapes_position_acc")}
        report |= {f"shapes_{group}": shapes[group] for group in ("by_count", "by_object", "by_relation")}

    # A sweep point that repeats the base setting (or another point) reuses its measurement.
    measured: dict[str, dict] = {json.dumps(base.describe()): {"fid": report["fid"], "ms_per_image": report["ms_per_image"], "nfe": report["nfe"]}}

    def measure(options) -> dict:
        key = json.dumps(options.describe())
        if key not in measured:
            swept, ms, nfe = _timed_generation(generator, tokenizer, prompts, encoder, options)
            measured[key] = {"fid": metrics.score(swept)["fid"], "ms_per_image": ms, "nfe": nfe}
        return measured[key]

    objective = generator.config.objective
    sweeps: dict[str, list[dict]] = {
        "steps": [{"steps": steps, **measure(replace(base, steps=steps))} for steps in p.steps_sweep],
        "guidance": [{"guidance": scale, **measure(replace(base, guidance=scale))} for scale in p.guidance_sweep],
        "samplers": [{"sampler": sampler, "steps": base.steps, **measure(replace(base, sampler=sampler))}
                     for sampler in (p.samplers if objective == "flow" else [])],
    }
    report["sweeps"] = sweeps
    report["protocol"] = {
        "samples": len(samples), "reference": "val split first, then train; prompts are their captions",
        "objective": objective, **base.describe(), "fid": metrics.protocol(),
        "probe": f"LiT probe ({ctx.inputs['probe'].relative_to(ctx.root)}); R@1 among groups of {group}",
        **({"clip_score": clip_protocol} if p.clip_weights else {}),
        "ms_per_image": f"wall time of prompt encoding, sampling and decoding in batches of 64 on "
                        f"{'CUDA' if torch.cuda.is_available() else 'CPU'}, {torch.get_num_threads()} threads",
    }
    report |= {"generator": str(generator_dir.relative_to(ctx.root)), "generator_hash": read_manifest(generator_dir)["content_hash"],
               "tokenizer": str(tokenizer_dir.relative_to(ctx.root)), "tokenizer_hash": tokenizer_hash}
    sets = {"eval captions": (prompts[: p.grid_images], images[: p.grid_images])}
    for name, set_prompts in p.prompt_sets.items():
        set_images, _ = generate_images(generator, tokenizer, set_prompts, encoder, base)
        sets[name] = (set_prompts, set_images)
    report["prompt_sets"] = save_prompt_sets(ctx.outputs["gen_eval"], sets)
    atomic_write_json(ctx.outputs["gen_eval"] / METRICS, report)
    previews = [(tensor_to_image(image), prompt) for image, prompt in zip(images[: ctx.params.tracking.contact_sheet], prompts)]
    numbers = {key: float(value) for key, value in report.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    plots = {"fid_vs_steps": sweeps["steps"], "fid_vs_guidance": sweeps["guidance"], "ms_vs_steps": sweeps["steps"]}
    return StageResult(counts={"samples": len(samples)}, metrics=numbers, report=report, samples=previews, plots=plots)


def save_prompt_sets(folder, sets: dict[str, tuple[list[str], Tensor]]) -> dict[str, list[dict]]:
    """Write each prompt set's images as PNGs under folder/samples/; returns set name -> [{prompt, file}]."""
    from tokenline.contact_sheet import png_bytes

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
    from tokenline.artifacts import git_commit
    from tokenline.eval.report import DatasetSection, render_report, report_row

    sections = []
    for name, folders in ctx.dataset_inputs.items():
        gen = json.loads((folders["gen_eval"] / METRICS).read_text())
        recon = json.loads((folders["recon_eval"] / METRICS).read_text())
        prompt_sets = {
            set_name: [{"prompt": item["prompt"], "png": (folders["gen_eval"] / item["file"]).read_bytes()} for item in items]
            for set_name, items in gen.get("prompt_sets", {}).items()
        }
        sections.append(DatasetSection(name, gen, recon, prompt_sets))
    html = render_report(sections, ctx.params.report.title, ctx.params.profile, git_commit(ctx.root) or "unknown")
    rows = [report_row(section) for section in sections]
    atomic_write_json(ctx.outputs["report"] / "summary.json", {"rows": rows})
    images = sum(len(items) for section in sections for items in section.prompt_sets.values())
    return StageResult(counts={"datasets": len(sections), "images": images}, html=html)
