"""1D generators at K = 16, 32, 64 tokens against a generator of the same width on a 2D grid of latents.

Lineages through the real pipeline, the same in everything but the tokenizer (by default the
cpu profile on OpenMoji 64 px, kl latents, so every generator is a flow transformer with the
profile's width, depth, steps, batch and lr):

* `1d-K<k>`: k learned latent tokens (TiTok), trained with the profile's recipe: two-stage
             against the grid teacher when `tokenizer.train.proxy_steps` > 0 (the cpu profile);
* `grid-p<p>`: the encoder's patch outputs are the latents, `tokenizer.model.layout=grid` and
             `tokenizer.num_tokens=(resolution / p)**2`, trained on pixels for the same steps
             (cpu: 64 px / patch 8 = an 8 x 8 grid, 64 tokens; `--grid-patches 8,4` adds the
             16 x 16 grid of patch 4).

Each runs `recon_eval`, `generator` and `probe`; then all are measured here on the same
reference set (gen_eval's: the first `--samples` (300) real images, val first, their captions
as prompts): tokens and floats per image, rFID/PSNR of the tokenizer, generator training s/step
(from the pipeline run, and re-timed here with the models alternating so all see the same
machine load), ms/image at the profile's sampling steps (median of `--repeats`, alternating),
NFE, FID, KID and the probe's R@1 (gen_eval's probe and group size; real images' R@1 beside it).

Stage outputs are copied from `--seed-from` roots (default: the repo) where their params and
inputs match; the runner retrains any copy that differs.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks grid_vs_1d [--root DIR] [--profile cpu]
       [--dataset openmoji] [--tokens 16,32,64] [--grid-patches 8] [--samples N] [--repeats 3]
       [--timed-steps 10] [--threads 1] [--set key=value ...] [--seed-from DIR ...] [--no-seed]
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

STAGES = ["recon_eval", "generator", "probe"]


def variants(root: Path, profile: str, dataset: str, tokens: list[int], patches: list[int],
             overrides: list[str]) -> dict[str, list[str]]:
    """The `--set` overrides of each lineage: kl latents; a grid's K is (resolution / patch)**2, trained on pixels."""
    resolution = bench_params(root, profile, dataset, overrides).data.resolution
    lineages = {f"1d-K{k}": ["tokenizer.quantizer=kl", f"tokenizer.num_tokens={k}", *overrides] for k in tokens}
    for patch in patches:
        side = resolution // patch
        lineages[f"grid-p{patch}"] = ["tokenizer.quantizer=kl", "tokenizer.model.layout=grid",
                                      f"tokenizer.model.patch_size={patch}", f"tokenizer.num_tokens={side * side}",
                                      "tokenizer.train.proxy_steps=0", *overrides]
    return lineages


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
    """Every figure of every variant on one reference set."""
    from tokenline.eval.generation import GenerationMetrics
    from tokenline.eval.probe import load_probe, probe_scores
    from tokenline.generator.generate import SamplingOptions
    from tokenline.generator.model import num_params
    from tokenline.text.captions import cached_text_encoder
    from tokenline.tokenizer.pixels import samples_to_batch
    from tokenline.tokenizer.token_cache import TokenCache

    first = next(iter(roots))
    references = {name: reference_set(root, dataset, samples) for name, root in roots.items()}
    keys = {name: [s["key"] for s in ref] for name, ref in references.items()}
    if any(keys[name] != keys[first] for name in roots):
        raise SystemExit("the roots' reference sets differ: their shards are not the same data")
    reference = references[first]
    prompts = [s["caption"] for s in reference]
    pairs = {name: load_pair(root, dataset) for name, root in roots.items()}
    encoders = {name: cached_text_encoder(root, params[name]) for name, root in roots.items()}
    for encoder in encoders.values():
        encoder.encode(prompts)  # warm the embedding caches before any timing
    real = samples_to_batch(reference, pairs[first][1].config.image_size)
    metrics = GenerationMetrics(real, kid_subset_size=params[first].gen_eval.kid_subset_size)
    base = SamplingOptions(**params[first].generator.sample.model_dump())
    # One probe (the first root's) scores every variant: it is trained on real images only, so it is the same model.
    probe = load_probe(output_path(roots[first], dataset, "probe"))
    pooled = encoders[first].encode(prompts).pooled.float()
    group = min(params[first].gen_eval.probe_group, len(prompts))
    real_r1 = probe_scores(probe, real, pooled, group=group)["probe_r1"]

    figures: dict[str, dict] = {}
    ms: dict[str, list[float]] = {name: [] for name in roots}
    for repeat in range(repeats):
        for name in roots:
            generator, tokenizer = pairs[name]
            images, per_image, nfe = timed_generation(generator, tokenizer, prompts, encoders[name], base)
            ms[name].append(per_image)
            if repeat == 0:
                figures[name] = {"nfe": nfe, **metrics.score(images),
                                 "probe_r1": probe_scores(probe, images, pooled, group=group)["probe_r1"],
                                 "probe_r1_real": real_r1}
                print(json.dumps({"variant": name, **figures[name], "ms_per_image": per_image}), flush=True)
    caches = {name: TokenCache(output_path(root, dataset, "tokens"), "train") for name, root in roots.items()}
    s_per_step = timed_training_steps({name: pair[0] for name, pair in pairs.items()}, caches, params[first],
                                      timed_steps, repeats)
    for name, root in roots.items():
        generator, tokenizer = pairs[name]
        gen_training = training_summary(root, dataset, "generator")
        tok_manifest = read_manifest(output_path(root, dataset, "tokenizer"))
        recon = json.loads(report_path(root, dataset, "recon_eval").read_text())
        batch = params[name].generator.train.batch_size
        figures[name] |= {
            "layout": tokenizer.config.layout, "tokens_per_image": tokenizer.config.num_tokens,
            "token_dim": tokenizer.config.token_dim,
            "floats_per_image": tokenizer.config.num_tokens * tokenizer.config.token_dim,
            "tokenizer_params": tokenizer.num_params(),
            "tokenizer_proxy_steps": params[name].tokenizer.train.proxy_steps,
            "tokenizer_train_s": tok_manifest["metrics"].get("wall_time_s"),
            "psnr": recon.get("psnr"), "ssim": recon.get("ssim"), "rfid": recon.get("rfid"),
            "generator_params": num_params(generator), "generator_width": generator.config.width,
            "generator_depth": generator.config.depth, "generator_steps": gen_training["steps"],
            "generator_s_per_step_pipeline": batch / gen_training["samples_per_s"] if gen_training["samples_per_s"] else None,
            "generator_s_per_step_timed": s_per_step[name],
            "ms_per_image": statistics.median(ms[name]), "ms_per_image_runs": ms[name],
        }
    return {"variants": figures, "protocol": {
        "samples": len(reference), "reference": "val split first, then train; prompts are their captions",
        "sampling": base.describe(), "fid": metrics.protocol(), "threads": torch.get_num_threads(),
        "probe": f"R@1 among {group} captions, the probe of {first}'s root (trained on real images only)",
        "ms_per_image": f"median of {repeats} alternating runs: prompt encoding (warm cache), sampling, decoding, batches of 64",
        "s_per_step_timed": f"median of {repeats} alternating runs of {timed_steps} steps after 3 warm-up steps, "
                            f"batch {params[first].generator.train.batch_size}, from the trained weights",
    }}


def main() -> None:
    """Train every lineage through the pipeline, measure them side by side, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, WORK / "grid_vs_1d", "openmoji")
    parser.add_argument("--tokens", default="16,32,64", help="comma-separated K of the 1D lineages")
    parser.add_argument("--grid-patches", default="8", help="comma-separated patch sizes of the grid lineages")
    parser.add_argument("--samples", type=int, default=300, help="generated = reference images (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timing runs (median reported)")
    parser.add_argument("--timed-steps", type=int, default=10, help="training steps per timing run")
    args = parser.parse_args()
    setup_threads(args.threads)
    sources = seed_sources(args)

    prepare_root(args.root, [], args.dataset, STAGES)
    lineages = variants(args.root, args.profile, args.dataset, [int(k) for k in args.tokens.split(",") if k],
                        [int(p) for p in args.grid_patches.split(",") if p], args.overrides)
    roots, params, pipeline = {}, {}, {}
    for name, overrides in lineages.items():
        roots[name] = args.root / name
        copied = prepare_root(roots[name], sources, args.dataset, STAGES)
        params[name] = bench_params(roots[name], args.profile, args.dataset, overrides)
        pipeline[name] = run_stages(roots[name], params[name], args.dataset, STAGES) | {"seeded": copied}
        print(f"{name}: seeded {copied or 'nothing'}, ran {pipeline[name]['ran'] or 'nothing (fresh)'} "
              f"in {pipeline[name]['wall_s']:.0f} s", flush=True)
        sources = [roots[name], *sources]  # later lineages share this one's data, teacher and probe

    started = time.perf_counter()
    figures = measure(roots, params, args.dataset, args.samples, args.repeats, args.timed_steps)
    figures |= {"measure_wall_s": time.perf_counter() - started, "pipeline": pipeline, "profile": args.profile,
                "dataset": args.dataset, "overrides": lineages}
    write_json(args.root / "grid_vs_1d.json", figures)

    v, proto = figures["variants"], figures["protocol"]
    first = next(iter(v))
    p = params[first]
    t, g = p.tokenizer, p.generator.train
    print(f"\n{args.dataset} at {p.data.resolution} px ({args.profile} profile), kl latents (D = {v[first]['token_dim']}), "
          f"tokenizer size {t.size} {t.model}, {t.train.steps} steps (1D: {t.train.proxy_steps} of them proxy); "
          f"flow generators width {v[first]['generator_width']} depth {v[first]['generator_depth']}, {g.steps} steps, "
          f"batch {g.batch_size}, lr {g.lr:g}; sampling {proto['sampling']['sampler']} {proto['sampling']['steps']} "
          f"steps, guidance {proto['sampling']['guidance']:g}; FID/KID on {proto['samples']} generated vs "
          f"{proto['samples']} real images (val first); probe {proto['probe']}; {proto['threads']} thread(s). "
          f"Figures: {args.root / 'grid_vs_1d.json'}\n")
    rows = [
        ("tokens per image", "tokens_per_image", "d"),
        ("floats per image", "floats_per_image", "d"),
        ("tokenizer params", "tokenizer_params", ",d"),
        ("tokenizer proxy steps", "tokenizer_proxy_steps", "d"),
        ("tokenizer training s (pipeline)", "tokenizer_train_s", ".0f"),
        ("tokenizer PSNR (val)", "psnr", ".2f"),
        ("tokenizer SSIM (val)", "ssim", ".3f"),
        ("tokenizer rFID (val)", "rfid", ".1f"),
        ("generator params", "generator_params", ",d"),
        ("generator training s/step (pipeline run)", "generator_s_per_step_pipeline", ".3f"),
        ("generator training s/step (timed here, alternating)", "generator_s_per_step_timed", ".3f"),
        (f"ms/image ({proto['sampling']['steps']} steps)", "ms_per_image", ".1f"),
        ("NFE", "nfe", "d"),
        ("FID", "fid", ".1f"),
        ("KID", "kid", ".4f"),
        ("probe R@1 (real images: {:.3f})".format(v[first]["probe_r1_real"]), "probe_r1", ".3f"),
    ]
    print(markdown_table(["", *v], [[label, *(fmt(v[name][key], spec) for name in v)] for label, key, spec in rows]))


if __name__ == "__main__":
    main()
