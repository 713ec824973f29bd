"""The 32-token 1D generator against a generator of the same width on a 2D grid of latents.

Two lineages through the real pipeline, the same in everything but the tokenizer's layout (by
default the cpu profile on OpenMoji 64 px, kl latents, so both generators are flow transformers
with the profile's width, depth, steps, batch and lr):

* `1d`:   the profile's K learned latent tokens (TiTok; 32 on the cpu profile);
* `grid`: the encoder's patch outputs are the latents, `tokenizer.model.layout=grid` and
          `tokenizer.num_tokens=(resolution / patch)**2` (cpu: 64 px / patch 8 = an 8 x 8 grid,
          f8, 64 tokens).

Each runs `recon_eval` and `generator`; then both are measured here on the same reference set
(gen_eval's: the first `--samples` (300) real images, val first, their captions as prompts):
tokens per image, rFID/PSNR of the tokenizer, generator training s/step (from the pipeline
run, and re-timed here with the two models alternating so both see the same machine load),
ms/image at the profile's sampling steps (median of `--repeats`, alternating), NFE, FID and KID.

The 1d lineage is the one `generation_sweeps.py` trains, so by default its outputs are copied
from that benchmark's root (then the repo's) and only re-measured; the runner retrains any copy
whose params or inputs differ.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks grid_vs_1d [--root DIR] [--profile cpu]
       [--dataset openmoji] [--samples N] [--repeats 3] [--timed-steps 10] [--threads 1]
       [--set key=value ...] [--seed-from DIR ...] [--no-seed]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import (
    REPO,
    WORK,
    add_common_arguments,
    bench_params,
    fmt,
    load_pair,
    markdown_table,
    prepare_root,
    reference_set,
    run_stages,
    seed_sources,
    setup_threads,
    timed_generation,
    training_summary,
    write_json,
)
from tokenline.artifacts import read_manifest
from tokenline.layout import output_path, report_path

STAGES = ["recon_eval", "generator"]


def variants(root: Path, profile: str, dataset: str, overrides: list[str]) -> dict[str, list[str]]:
    """The `--set` overrides of each lineage: kl latents; the grid's K is (resolution / patch)**2 of the profile."""
    from tokenline.tokenizer.spec import tokenizer_config

    grid = tokenizer_config(bench_params(root, profile, dataset, ["tokenizer.quantizer=kl", *overrides]), 0).grid
    return {"1d": ["tokenizer.quantizer=kl", *overrides],
            "grid": ["tokenizer.quantizer=kl", "tokenizer.model.layout=grid", f"tokenizer.num_tokens={grid * grid}",
                     *overrides]}


def timed_training_steps(models: dict, caches: dict, params, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per generator training step (flow loss, backward, clip, AdamW) per variant, variants alternating."""
    from tokenline.generator.objectives import flow_matching_loss
    from tokenline.generator.train import cache_batches, text_batch

    t = params.generator.train
    setups = {}
    for name, trained in models.items():
        model = copy.deepcopy(trained).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        setups[name] = (model, optimizer, cache_batches(caches[name], t.batch_size, t.seed))
    timings: dict[str, list[float]] = {name: [] for name in models}

    def step(name: str) -> None:
        """One training step of one variant."""
        model, optimizer, batches = setups[name]
        rows = next(batches)
        drop = torch.rand(len(rows["latents"])) < t.caption_dropout
        loss = flow_matching_loss(model, model.normalize(rows["latents"]), text_batch(rows), drop, t.time_mean, t.time_std)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for name in models:  # warm-up
        for _ in range(3):
            step(name)
    for _ in range(repeats):
        for name in models:
            started = time.perf_counter()
            for _ in range(steps):
                step(name)
            timings[name].append((time.perf_counter() - started) / steps)
    return {name: statistics.median(values) for name, values in timings.items()}


def measure(roots: dict[str, Path], params: dict, dataset: str, samples: int, repeats: int, timed_steps: int) -> dict:
    """Every figure of both variants on one reference set."""
    from tokenline.eval.generation import GenerationMetrics
    from tokenline.generator.generate import SamplingOptions
    from tokenline.generator.model import num_params
    from tokenline.text.captions import cached_text_encoder
    from tokenline.tokenizer.pixels import samples_to_batch
    from tokenline.tokenizer.token_cache import TokenCache

    references = {name: reference_set(root, dataset, samples) for name, root in roots.items()}
    keys = {name: [s["key"] for s in ref] for name, ref in references.items()}
    if keys["1d"] != keys["grid"]:
        raise SystemExit("the two roots' reference sets differ: their shards are not the same data")
    reference = references["1d"]
    prompts = [s["caption"] for s in reference]
    pairs = {name: load_pair(root, dataset) for name, root in roots.items()}
    encoders = {name: cached_text_encoder(root, params[name]) for name, root in roots.items()}
    for encoder in encoders.values():
        encoder.encode(prompts)  # warm the embedding caches before any timing
    metrics = GenerationMetrics(samples_to_batch(reference, pairs["1d"][1].config.image_size),
                                kid_subset_size=params["1d"].gen_eval.kid_subset_size)
    base = SamplingOptions(**params["1d"].generator.sample.model_dump())

    figures: dict[str, dict] = {}
    ms: dict[str, list[float]] = {name: [] for name in roots}
    for repeat in range(repeats):
        for name in roots:
            generator, tokenizer = pairs[name]
            images, per_image, nfe = timed_generation(generator, tokenizer, prompts, encoders[name], base)
            ms[name].append(per_image)
            if repeat == 0:
                figures[name] = {"nfe": nfe, **metrics.score(images)}
                print(json.dumps({"variant": name, **figures[name], "ms_per_image": per_image}), flush=True)
    caches = {name: TokenCache(output_path(root, dataset, "tokens"), "train") for name, root in roots.items()}
    s_per_step = timed_training_steps({name: pair[0] for name, pair in pairs.items()}, caches, params["1d"],
                                      timed_steps, repeats)
    for name, root in roots.items():
        generator, tokenizer = pairs[name]
        gen_training = training_summary(root, dataset, "generator")
        tok_manifest = read_manifest(output_path(root, dataset, "tokenizer"))
        recon = json.loads(report_path(root, dataset, "recon_eval").read_text())
        batch = params[name].generator.train.batch_size
        figures[name] |= {
            "layout": tokenizer.config.layout, "tokens_per_image": tokenizer.config.num_tokens,
            "token_dim": tokenizer.config.token_dim, "tokenizer_params": tokenizer.num_params(),
            "tokenizer_train_s": tok_manifest["metrics"].get("wall_time_s"),
            "psnr": recon.get("psnr"), "rfid": recon.get("rfid"),
            "generator_params": num_params(generator), "generator_width": generator.config.width,
            "generator_depth": generator.config.depth, "generator_steps": gen_training["steps"],
            "generator_s_per_step_pipeline": batch / gen_training["samples_per_s"] if gen_training["samples_per_s"] else None,
            "generator_s_per_step_timed": s_per_step[name],
            "ms_per_image": statistics.median(ms[name]), "ms_per_image_runs": ms[name],
        }
    return {"variants": figures, "protocol": {
        "samples": len(reference), "reference": "val split first, then train; prompts are their captions",
        "sampling": base.describe(), "fid": metrics.protocol(), "threads": torch.get_num_threads(),
        "ms_per_image": f"median of {repeats} alternating runs: prompt encoding (warm cache), sampling, decoding, batches of 64",
        "s_per_step_timed": f"median of {repeats} alternating runs of {timed_steps} steps after 3 warm-up steps, "
                            f"batch {params['1d'].generator.train.batch_size}, from the trained weights",
    }}


def main() -> None:
    """Train both lineages through the pipeline, measure both, print the side-by-side table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, WORK / "grid_vs_1d", "openmoji")
    parser.add_argument("--samples", type=int, default=300, help="generated = reference images (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timing runs (median reported)")
    parser.add_argument("--timed-steps", type=int, default=10, help="training steps per timing run")
    args = parser.parse_args()
    setup_threads(args.threads)
    sources = seed_sources(args)
    if not args.no_seed and not args.seed_from:
        sources = [WORK / "generation_sweeps", REPO]

    prepare_root(args.root, [], args.dataset, STAGES)
    lineages = variants(args.root, args.profile, args.dataset, args.overrides)
    roots, params, pipeline = {}, {}, {}
    for name, overrides in lineages.items():
        roots[name] = args.root / name
        copied = prepare_root(roots[name], sources, args.dataset, STAGES)
        params[name] = bench_params(roots[name], args.profile, args.dataset, overrides)
        pipeline[name] = run_stages(roots[name], params[name], args.dataset, STAGES) | {"seeded": copied}
        print(f"{name}: seeded {copied or 'nothing'}, ran {pipeline[name]['ran'] or 'nothing (fresh)'} "
              f"in {pipeline[name]['wall_s']:.0f} s", flush=True)

    started = time.perf_counter()
    figures = measure(roots, params, args.dataset, args.samples,
                      args.repeats, args.timed_steps)
    figures |= {"measure_wall_s": time.perf_counter() - started, "pipeline": pipeline, "profile": args.profile,
                "dataset": args.dataset, "overrides": lineages}
    write_json(args.root / "grid_vs_1d.json", figures)

    v, proto, p = figures["variants"], figures["protocol"], params["1d"]
    t, g = p.tokenizer, p.generator.train
    print(f"\n{args.dataset} at {p.data.resolution} px ({args.profile} profile), kl latents (D = {v['1d']['token_dim']}), "
          f"tokenizer size {t.size} {t.model}, {t.train.steps} steps; flow generators width {v['1d']['generator_width']} "
          f"depth {v['1d']['generator_depth']}, {g.steps} steps, batch {g.batch_size}, lr {g.lr:g}; sampling "
          f"{proto['sampling']['sampler']} {proto['sampling']['steps']} steps, guidance {proto['sampling']['guidance']:g}; "
          f"FID/KID on {proto['samples']} generated vs {proto['samples']} real images (val first); "
          f"{proto['threads']} thread(s). Figures: {args.root / 'grid_vs_1d.json'}\n")
    rows = [
        ("tokens per image", "tokens_per_image", "d"),
        ("tokenizer params", "tokenizer_params", ",d"),
        ("tokenizer training s (pipeline)", "tokenizer_train_s", ".0f"),
        ("tokenizer PSNR (val)", "psnr", ".2f"),
        ("tokenizer rFID (val)", "rfid", ".1f"),
        ("generator params", "generator_params", ",d"),
        ("generator training s/step (pipeline run)", "generator_s_per_step_pipeline", ".3f"),
        ("generator training s/step (timed here, alternating)", "generator_s_per_step_timed", ".3f"),
        (f"ms/image ({proto['sampling']['steps']} steps)", "ms_per_image", ".1f"),
        ("NFE", "nfe", "d"),
        ("FID", "fid", ".1f"),
        ("KID", "kid", ".4f"),
    ]
    print(markdown_table(["", f"1D (K = {v['1d']['tokens_per_image']})",
                          f"grid ({v['grid']['tokens_per_image']} tokens, one per patch)"],
                         [[label, fmt(v["1d"][key], spec), fmt(v["grid"][key], spec)] for label, key, spec in rows]))


if __name__ == "__main__":
    main()
