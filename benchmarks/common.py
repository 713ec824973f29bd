"""Helpers every benchmark shares: scratch roots seeded from a project, runner calls, reference sets, timing, tables.

Imported as `benchmarks.common` (run benchmarks as `python -m benchmarks NAME`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from tokenline.artifacts import read_manifest
from tokenline.config import Params
from tokenline.params_loading import load_params
from tokenline.layout import output_path, report_path, samples_path
from tokenline.pipeline import get_stage, stage_closure
from tokenline.runner import run_with_upstream
from tokenline.threads import usable_cores

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / ".work"


def setup_threads(threads: int) -> None:
    """Pin torch's intra-op threads and say whether other work shares the machine (then timings are upper bounds)."""
    torch.set_num_threads(threads)
    cores, load = usable_cores(), os.getloadavg()[0]
    print(f"threads: {threads} of {cores} usable cores; 1-minute load average before this run {load:.2f}", flush=True)
    if load + threads > cores + 0.5:
        print(f"note: this machine is shared (load {load:.2f} + {threads} thread(s) > {cores} cores): "
              "times are upper bounds; compare A/B only within one run", flush=True)


def seed_outputs(root: Path, sources: list[Path], dataset: str, stages: list[str]) -> list[str]:
    """Copy each upstream stage's outputs that `root` lacks from the first source holding them all; returns the stages copied.

    The runner then checks every copy like its own output (params slice and input hashes),
    so a copy made under other params is retrained, never trusted.
    """
    copied = []
    closure = {s.name: s for name in stages for s in stage_closure(get_stage(name))}
    for stage in closure.values():
        if all(read_manifest(output_path(root, dataset, out)) is not None for out in stage.outputs):
            continue
        for source in sources:
            if source.resolve() == root.resolve():
                continue
            if not all(read_manifest(output_path(source, dataset, out)) is not None for out in stage.outputs):
                continue
            for out in stage.outputs:
                target = output_path(root, dataset, out)
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(output_path(source, dataset, out), target)
            for extra in (report_path, samples_path):
                file = extra(source, dataset, stage.name)
                if file.is_file():
                    extra(root, dataset, stage.name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, extra(root, dataset, stage.name))
            copied.append(stage.name)
            break
    text_cache = [s / "data" / ".text_cache" for s in sources if (s / "data" / ".text_cache").is_dir()]
    if text_cache:  # caption embeddings keyed by encoder fingerprint: safe to share
        shutil.copytree(text_cache[0], root / "data" / ".text_cache", dirs_exist_ok=True)
    return copied


def prepare_root(root: Path, seed_from: list[Path], dataset: str, stages: list[str]) -> list[str]:
    """Create the scratch root with a copy of params.yaml and seed it from other roots; returns the stages copied."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return seed_outputs(root, seed_from, dataset, stages) if seed_from else []


def bench_params(root: Path, profile: str, dataset: str, overrides: list[str]) -> Params:
    """Params of the scratch root with tracking off and the `--set` overrides applied."""
    return load_params(root / "params.yaml", profile=profile, overrides=["tracking.enabled=false", *overrides],
                       dataset=dataset)


def run_stages(root: Path, params: Params, dataset: str, stages: list[str]) -> dict[str, Any]:
    """Run each stage after its stale upstream; {"ran": stage names that ran, "wall_s": seconds}."""
    started, ran = time.perf_counter(), []
    for name in stages:
        for run in run_with_upstream(get_stage(name), params, dataset, root):
            if not run.skipped and run.stage not in ran:
                ran.append(run.stage)
    return {"ran": ran, "wall_s": time.perf_counter() - started}


def stage_inputs(root: Path, dataset: str, *outputs: str) -> dict[str, Path]:
    """Output name -> committed folder in the scratch root, as a StageContext's `inputs`."""
    return {name: output_path(root, dataset, name) for name in outputs}


def reference_set(root: Path, dataset: str, count: int) -> list[dict]:
    """gen_eval's reference samples (val split first, then train; captions from the captions stage)."""
    from tokenline.eval.stages import reference_samples

    inputs = stage_inputs(root, dataset, "shards", "captions")
    return reference_samples(inputs["shards"], inputs["captions"], count)


def load_pair(root: Path, dataset: str):
    """(generator, tokenizer) of the scratch root after gen_eval's pairing check."""
    from tokenline.generator.checkpoint import check_pairing, load_generator
    from tokenline.tokenizer.model import Tokenizer1D

    generator_dir, tokenizer_dir = output_path(root, dataset, "generator"), output_path(root, dataset, "tokenizer")
    check_pairing(generator_dir, tokenizer_dir, read_manifest(tokenizer_dir)["content_hash"])
    return load_generator(generator_dir), Tokenizer1D.from_checkpoint(tokenizer_dir)


def timed_generation(generator, tokenizer, prompts: list[str], encoder, options) -> tuple[torch.Tensor, float, int]:
    """(images, ms per image, NFE per batch): gen_eval's `generate_images` call, timed."""
    from tokenline.generator.generate import generate_images

    started = time.perf_counter()
    with torch.no_grad():
        images, nfe = generate_images(generator, tokenizer, prompts, encoder, options)
    return images, 1000.0 * (time.perf_counter() - started) / max(1, len(prompts)), nfe


def reconstruct(tokenizer, images: torch.Tensor, captions: list[str], encoder) -> torch.Tensor:
    """Images through the tokenizer (encode, decode) in batches of 64; captions condition a text-conditioned one."""
    from tokenline.generator.generate import encode_prompts

    out = []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            text = None
            if tokenizer.config.text_dim:
                batch, _ = encode_prompts(captions[start : start + 64], encoder, tokenizer.config.text_tokens)
                text = (batch.states, batch.mask)
            out.append(tokenizer(images[start : start + 64], text)[0])
    return torch.cat(out)


def training_summary(root: Path, dataset: str, output: str) -> dict:
    """A training stage's training.json (steps, samples_per_s, wall_time_s, ...)."""
    return json.loads((output_path(root, dataset, output) / "training.json").read_text())


def write_json(path: Path, figures: dict) -> None:
    """Write the figures as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, default=str) + "\n")


def fmt(value, spec: str) -> str:
    """A number formatted, or "-" for None."""
    return "-" if value is None else format(value, spec)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def add_common_arguments(parser: argparse.ArgumentParser, root: Path, dataset: str) -> None:
    """--root, --profile, --dataset, --threads, --set, --seed-from, --no-seed."""
    parser.add_argument("--root", type=Path, default=root, help=f"scratch project root (default {root})")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--dataset", default=dataset)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="params override passed to the pipeline (repeatable)")
    parser.add_argument("--seed-from", type=Path, action="append", default=None, metavar="DIR",
                        help="project roots to copy missing stage outputs from (default: the repo)")
    parser.add_argument("--no-seed", action="store_true", help="copy nothing: every stage runs in the scratch root")


def seed_sources(args: argparse.Namespace) -> list[Path]:
    """The roots to seed from, per --seed-from / --no-seed."""
    return [] if args.no_seed else (args.seed_from or [REPO])
