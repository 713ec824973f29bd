"""Teach a trained shapes generator to bind relations: a twins lineage fine-tuned by the pipeline's stages.

`shapes_binding.py` shows the lineage's generator reads captions as bags of words: which colour
goes where is settled at t > 0.85, where a caption and its swap fit alike. This benchmark builds
a second lineage in the scratch root `--out` with the runner, from the `--root` lineage's
checkpoints, and measures it:

1. data: `datasets.shapes.source=shapes:twins` with the lineage's `--set`s: every scene whose
   first two shapes can trade places gets a twin, captioned with its original's swap;
2. tokenizer: `tokenizer.init=<--decoder>` (the lineage's decoder fine-tune, or its tokenizer)
   with `tokenizer.train.freeze_encoder` and a few decoder steps at a small lr on the twins
   data. The encoder side is the lineage's, so the `tokens` stage's latents of the original
   scenes are checked bit-identical to the lineage's cache;
3. generator: `generator.init=<--root>/models/shapes/generator` and the swap term, in phases
   (`--phase STEPS,SWAP_WEIGHT,TIME_MEAN,LR`, repeatable; the default is the README's
   schedule). The first phase is a fresh `generator` run; each later one resumes it (`--resume
   --force`, as a user would) up to the cumulative step count, with a constant lr;
4. the benchmark's prompts (`shapes_accuracy.py`: 160 single-object, 200 two-object) sampled
   with the lineage's sampler at each `--guidance`, decoded by the new lineage's tokenizer,
   and the checker's accuracies printed.

A phase whose output is fresh is not run again. Figures go to OUT/result.json. The `--root`
lineage is left untouched. Why a fine-tune and not a twins lineage from scratch: that means a
new tokenizer and 27,000 generator steps, several CPU hours; on a GPU box set the same params
(README, shapes) without the inits.

Usage: OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks shapes_twins_finetune --root DIR --out DIR
       [--set key=value ...] [--decoder DIR] [--decoder-steps 50] [--phase STEPS,WEIGHT,TIME_MEAN,LR ...]
       [--guidance 5 ...] [--threads 2] [--seed-from DIR ...]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import bench_params, load_pair, prepare_root, setup_threads
from benchmarks.shapes_accuracy import single_object_prompts, two_object_prompts
from tokenline.eval.compositional import score_images
from tokenline.generator.generate import (
    SamplingOptions,
    encode_prompts,
    sample_tokens,
    tokens_to_images,
)
from tokenline.layout import output_path
from tokenline.pipeline import get_stage
from tokenline.runner import run_one, run_with_upstream, staleness
from tokenline.text.captions import cached_text_encoder
from tokenline.tokenizer.pixels import tensor_to_image
from tokenline.tokenizer.token_cache import TokenCache

# The README's schedule: a strong swap term at the deciding noise level, then gentler phases
# that give back the single-object accuracy the strong one costs, and last two phases spent on
# fine detail (time_mean -1: low noise, where shapes are drawn and layout is already fixed).
DEFAULT_PHASES = ["3000,3,1.0,1e-4", "1000,1,0,5e-5", "1500,0.3,0,5e-5", "1500,0.1,0,3e-5",
                  "1500,0.1,-1.0,3e-5", "1500,0,-1.0,2e-5"]
SAMPLE_CHUNK = 50  # prompts per sampling call; each call starts from the same seed


def lineage_sets(args) -> list[str]:
    """The twins lineage's params overrides shared by every phase: data, tokenizer fine-tune, generator start."""
    decoder = (args.decoder or output_path(args.root, "shapes", "tokenizer")).resolve()
    return [*args.overrides, "datasets.shapes.source=shapes:twins",
            f"tokenizer.init={decoder}", "tokenizer.train.freeze_encoder=true",
            f"tokenizer.train.steps={args.decoder_steps}", "tokenizer.train.lr=1e-5", "tokenizer.train.warmup_steps=1",
            f"generator.init={output_path(args.root, 'shapes', 'generator').resolve()}",
            "generator.train.warmup_steps=0", "generator.train.min_lr_ratio=1.0", "generator.train.ema_decay=0.995",
            "generator.train.checkpoint_every=500", "generator.train.log_every=100"]


def phase_sets(phases: list[str]) -> list[list[str]]:
    """Each `STEPS,WEIGHT,TIME_MEAN,LR` phase as generator.train overrides, steps counted from the start."""
    total, sets = 0, []
    for phase in phases:
        steps, weight, time_mean, lr = phase.split(",")
        total += int(steps)
        sets.append([f"generator.train.steps={total}", f"generator.train.swap_weight={weight}",
                     f"generator.train.time_mean={time_mean}", f"generator.train.lr={lr}"])
    return sets


def train_phases(out: Path, shared: list[str], phases: list[str]):
    """Run the phases not yet fresh (the first from generator.init, the rest resumed); returns the last phase's params."""
    stage = get_stage("generator")
    all_params = [bench_params(out, "cpu", "shapes", [*shared, *sets]) for sets in phase_sets(phases)]
    # The latest phase whose output is fresh: training goes on from the phase after it.
    done = next((i for i in reversed(range(len(phases))) if staleness(stage, all_params[i], "shapes", out) is None), -1)
    for number, params in enumerate(all_params):
        if number <= done:
            print(f"phase {number + 1} ({phases[number]}) already trained", flush=True)
            continue
        if number == 0:
            ran = [run.stage for run in run_with_upstream(stage, params, "shapes", out) if not run.skipped]
            print(f"ran {ran}", flush=True)
        else:
            run_one(stage, params, "shapes", out, resume=True, force=True)
        training = json.loads((output_path(out, "shapes", "generator") / "training.json").read_text())
        print(f"phase {number + 1} ({phases[number]}): step {training['steps']}, loss {training['final_loss']:.4f}, "
              f"{training['wall_time_s']:.0f} s", flush=True)
    return all_params[-1]


def check_originals_match(cache: TokenCache, lineage: TokenCache) -> int:
    """Refuse a twins cache whose original scenes differ from the lineage cache's rows; returns how many matched."""
    rows = {key: row for row, key in enumerate(cache.keys)}
    matched = [(rows[key], row) for row, key in enumerate(lineage.keys) if key in rows]
    if len(matched) != len(lineage):
        raise SystemExit(f"{len(lineage) - len(matched)} of the lineage's {len(lineage)} train scenes are missing "
                         "from the twins data; pass the lineage's --set datasets.shapes.*")
    ours, theirs = cache.rows([a for a, _ in matched]), lineage.rows([b for _, b in matched])
    for name in ("latents", "text_tokens", "text_pooled"):
        if not torch.equal(ours[name], theirs[name]):
            raise SystemExit(f"the twins cache's {name} of the original scenes differ from the lineage's")
    return len(matched)


def score(generator, decoder, encoder, options) -> dict:
    """The checker's accuracies on the benchmark's single- and two-object prompts."""
    result = {}
    for name, prompts in (("single", single_object_prompts(2)), ("two", two_object_prompts(200, options.seed))):
        text, _ = encode_prompts(prompts, encoder, generator.config.text_tokens)
        chunks = []
        for start in range(0, len(prompts), SAMPLE_CHUNK):
            keep = torch.arange(start, min(start + SAMPLE_CHUNK, len(prompts)))
            tokens, _ = sample_tokens(generator, text.select(keep), options)
            with torch.no_grad():
                chunks.append(tokens_to_images(tokens, decoder))
        report = score_images([tensor_to_image(image) for image in torch.cat(chunks)], prompts)
        result[name] = {key: report[key] for key in ("shapes_color_acc", "shapes_shape_acc", "shapes_position_acc")}
    return result


def main() -> None:
    """Build and fine-tune the twins lineage, sample and print the accuracies."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="a shapes_accuracy.py lineage root (generator trained)")
    parser.add_argument("--out", type=Path, required=True, help="scratch root of the twins lineage and result.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="the lineage's params overrides")
    parser.add_argument("--decoder", type=Path, default=None,
                        help="tokenizer to start from (a freeze_encoder fine-tune of the lineage's; default its own)")
    parser.add_argument("--decoder-steps", type=int, default=50, help="decoder steps on the twins data (lr 1e-5)")
    parser.add_argument("--phase", dest="phases", action="append", default=None, metavar="STEPS,WEIGHT,TIME_MEAN,LR",
                        help=f"a generator phase (repeatable; default {' '.join(DEFAULT_PHASES)})")
    parser.add_argument("--guidance", type=float, action="append", default=None, help="repeatable; default 5 and 7")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed-from", type=Path, action="append", default=[], metavar="DIR",
                        help="project roots to copy fresh twins data stages from (the runner checks their params)")
    args = parser.parse_args()
    setup_threads(args.threads)
    torch.manual_seed(0)

    copied = prepare_root(args.out, args.seed_from, "shapes", ["captions"])
    if (args.root / "data" / ".text_cache").is_dir():  # caption embeddings keyed by encoder fingerprint
        import shutil

        shutil.copytree(args.root / "data" / ".text_cache", args.out / "data" / ".text_cache", dirs_exist_ok=True)
    print(f"seeded {copied}", flush=True)
    phases = args.phases or DEFAULT_PHASES
    params = train_phases(args.out, lineage_sets(args), phases)
    matched = check_originals_match(TokenCache(output_path(args.out, "shapes", "tokens"), "train"),
                                    TokenCache(output_path(args.root, "shapes", "tokens"), "train"))
    print(f"the tokens stage's latents of the lineage's {matched} train scenes are bit-identical to its cache", flush=True)

    generator, tokenizer = load_pair(args.out, "shapes")
    encoder = cached_text_encoder(args.out, params)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "phases": phases, "scores": {}}
    for guidance in args.guidance or [5.0, 7.0]:
        options = replace(SamplingOptions(**params.generator.sample.model_dump()), guidance=guidance)
        scores = score(generator.eval(), tokenizer, encoder, options)
        result["scores"][str(guidance)] = scores
        for name, accuracies in scores.items():
            print(f"guidance {guidance:g} {name}:", {k: round(v, 3) for k, v in accuracies.items() if v is not None},
                  flush=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
