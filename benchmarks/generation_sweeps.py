"""FID/KID of a flow generator against Euler steps and guidance, probe alignment, and the sampler table.

The tokenizer, generator and probe come from the real pipeline (`run_with_upstream` up to the
`generator` and `probe` stages, by default the cpu profile on OpenMoji with a kl tokenizer, so the
generator is a flow transformer); the figures are then measured here with the same library calls
as the `gen_eval` stage and against the same reference set (the first `--samples` (300) real
images, val split first, their captions as prompts):

* FID and KID for Euler at each `--steps` count, without guidance (scale 1) and with guidance
  (`--guidance`, default 3.0 or the profile's scale when that is above 1);
* probe score and R@1 of generated images against the real ones at the profile's sampling
  setup (and with guidance), with the goal "generated R@1 >= 1/2 of real" as met / not met,
  and of the real images passed through the tokenizer: the ceiling of any generator over its
  tokens;
* each sampler at the profile's step count: ms per image, NFE and FID.

Stage outputs are reused while fresh (a rerun only re-measures); `--seed-from` copies missing
upstream outputs from another project root (default: the repo's own `data/` and `models/`)
before the runner checks them, so a stale copy is simply retrained. ms/image is the wall time
of prompt encoding (warm embedding cache), sampling and decoding, in batches of 64, with the
threads given by `--threads`; single runs vary by about 15 % on a shared machine.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks generation_sweeps [--root DIR]
       [--profile cpu] [--dataset openmoji] [--samples N] [--steps 1,2,4,8,25] [--guidance 3.0]
       [--samplers euler,heun,euler_maruyama,time_shift] [--probe-guidance 5,7] [--threads 1] [--set key=value ...]
       [--seed-from DIR ...] [--no-seed]

The helpers it shares with the other benchmarks live in `benchmarks/common.py`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
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
    reconstruct,
    reference_set,
    run_stages,
    seed_sources,
    setup_threads,
    timed_generation,
    training_summary,
    write_json,
)
from tokenline.artifacts import read_manifest
from tokenline.config import Params
from tokenline.layout import output_path

# --------------------------------------------------------------------------------------
# This benchmark
# --------------------------------------------------------------------------------------


def measure(root: Path, params: Params, dataset: str, samples: int, steps_list: list[int], guidance: float,
            samplers: list[str], probe_guidance: list[float] = ()) -> dict:
    """Every figure of the benchmark, from the scratch root's generator, tokenizer and probe."""
    from tokenline.eval.generation import GenerationMetrics
    from tokenline.eval.probe import load_probe, probe_scores
    from tokenline.generator.generate import SamplingOptions
    from tokenline.text.captions import cached_text_encoder
    from tokenline.tokenizer.pixels import samples_to_batch

    p = params.gen_eval
    generator, tokenizer = load_pair(root, dataset)
    if generator.config.objective != "flow":
        raise SystemExit(f"the generator is {generator.config.objective}, not flow: pass --set tokenizer.quantizer=kl")
    encoder = cached_text_encoder(root, params)
    reference = reference_set(root, dataset, samples)
    prompts = [s["caption"] for s in reference]
    real = samples_to_batch(reference, tokenizer.config.image_size)
    started = time.perf_counter()
    metrics = GenerationMetrics(real, kid_subset_size=p.kid_subset_size)
    pooled = encoder.encode(prompts).pooled.float()  # also warms the embedding cache before any timing
    base = SamplingOptions(**params.generator.sample.model_dump())
    print(f"reference: {len(reference)} images, Inception statistics in {time.perf_counter() - started:.0f} s", flush=True)

    runs: dict[tuple, dict] = {}

    def run(options) -> dict:
        """Generate, time and score one sampling setup (cached by its options)."""
        key = (options.sampler, options.steps, options.guidance)
        if key not in runs:
            images, ms, nfe = timed_generation(generator, tokenizer, prompts, encoder, options)
            runs[key] = {"sampler": options.sampler, "steps": options.steps, "guidance": options.guidance,
                         "ms_per_image": ms, "nfe": nfe, **metrics.score(images), "images": images}
            row = {k: v for k, v in runs[key].items() if k != "images"}
            print(json.dumps(row), flush=True)
        return runs[key]

    scales = [1.0, guidance]
    euler = [run(replace(base, sampler="euler", steps=s, guidance=g)) for g in scales for s in steps_list]
    group = min(p.probe_group, len(reference))
    probe_model = load_probe(output_path(root, dataset, "probe"))
    real_scores = probe_scores(probe_model, real, pooled, group=group)
    # The same real images through the tokenizer (encode, decode): what any generator over
    # these tokens could reach at best.
    recon_scores = probe_scores(probe_model, reconstruct(tokenizer, real, prompts, encoder), pooled, group=group)
    probes = []
    for g in dict.fromkeys([base.guidance, *scales, *probe_guidance]):
        generated = probe_scores(probe_model, run(replace(base, guidance=g))["images"], pooled, group=group)
        probes.append({"sampler": base.sampler, "steps": base.steps, "guidance": g,
                       "probe_score": generated["probe_score"], "probe_r1": generated["probe_r1"],
                       "goal_met": generated["probe_r1"] >= 0.5 * real_scores["probe_r1"]})
    table = [run(replace(base, sampler=s)) for s in samplers]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images"} for r in rows]  # noqa: E731
    return {
        "generator_config": {k: getattr(generator.config, k) for k in ("objective", "width", "depth", "num_tokens", "token_dim")},
        "euler": strip(euler), "samplers": strip(table), "probe": probes,
        "probe_real": {"probe_score": real_scores["probe_score"], "probe_r1": real_scores["probe_r1"]},
        "probe_reconstructed": {"probe_score": recon_scores["probe_score"], "probe_r1": recon_scores["probe_r1"]},
        "protocol": {"samples": len(reference), "reference": "val split first, then train; prompts are their captions",
                     "base": base.describe(), "probe_group": group, "fid": metrics.protocol(),
                     "threads": torch.get_num_threads(),
                     "ms_per_image": "prompt encoding (warm cache), sampling and decoding, batches of 64"},
    }


def main() -> None:
    """Train up to generator and probe through the pipeline, measure, print the tables and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, WORK / "generation_sweeps", "openmoji")
    parser.add_argument("--samples", type=int, default=300, help="generated = reference images (default 300)")
    parser.add_argument("--steps", default="1,2,4,8,25", help="Euler step counts")
    parser.add_argument("--guidance", type=float, default=None,
                        help="the guided scale (default 3.0, or generator.sample.guidance when that is > 1)")
    parser.add_argument("--samplers", default="euler,heun,euler_maruyama,time_shift")
    parser.add_argument("--probe-guidance", default="",
                        help="further guidance scales for the probe table only, e.g. 5,7 (each also gets FID/KID)")
    args = parser.parse_args()
    setup_threads(args.threads)
    overrides = ["tokenizer.quantizer=kl", *args.overrides]

    copied = prepare_root(args.root, seed_sources(args), args.dataset, ["generator", "probe"])
    params = bench_params(args.root, args.profile, args.dataset, overrides)
    pipeline = run_stages(args.root, params, args.dataset, ["generator", "probe"])
    print(f"pipeline: seeded {copied or 'nothing'}, ran {pipeline['ran'] or 'nothing (fresh)'} "
          f"in {pipeline['wall_s']:.0f} s", flush=True)

    guidance = args.guidance or (params.generator.sample.guidance if params.generator.sample.guidance > 1 else 3.0)
    started = time.perf_counter()
    figures = measure(args.root, params, args.dataset, args.samples,
                      [int(s) for s in args.steps.split(",")], guidance, args.samplers.split(","),
                      [float(g) for g in args.probe_guidance.split(",") if g])
    figures |= {"measure_wall_s": time.perf_counter() - started, "pipeline": pipeline, "seeded": copied,
                "profile": args.profile, "dataset": args.dataset, "overrides": overrides,
                "generator_training": training_summary(args.root, args.dataset, "generator"),
                "tokenizer_hash": read_manifest(output_path(args.root, args.dataset, "tokenizer"))["content_hash"]}
    write_json(args.root / "generation_sweeps.json", figures)

    g, t = figures["generator_config"], params.tokenizer
    proto = figures["protocol"]
    print(f"\n{args.dataset} at {params.data.resolution} px ({args.profile} profile), tokenizer {t.quantizer} K = "
          f"{t.num_tokens}, flow generator width {g['width']} depth {g['depth']}, "
          f"{figures['generator_training']['steps']} steps; {proto['samples']} generated vs {proto['samples']} real "
          f"images (val first), KID subsets of {params.gen_eval.kid_subset_size}, probe R@1 in groups of "
          f"{proto['probe_group']}; {proto['threads']} thread(s). Figures: {args.root / 'generation_sweeps.json'}\n")
    rows = []
    for step in [int(s) for s in args.steps.split(",")]:
        row = [str(step)]
        for scale in (1.0, guidance):
            r = next(e for e in figures["euler"] if e["steps"] == step and e["guidance"] == scale)
            row += [fmt(r["fid"], ".1f"), fmt(r["kid"], ".4f"), str(r["nfe"]), fmt(r["ms_per_image"], ".1f")]
        rows.append(row)
    print("Euler: FID/KID vs steps, without and with guidance\n")
    print(markdown_table(["steps", "FID (1.0)", "KID (1.0)", "NFE (1.0)", "ms/img (1.0)",
                          f"FID ({guidance:g})", f"KID ({guidance:g})", f"NFE ({guidance:g})",
                          f"ms/img ({guidance:g})"], rows))
    real = figures["probe_real"]
    print(f"\nProbe alignment at {base_text(proto['base'])} (goal: generated R@1 >= 1/2 of real = "
          f"{0.5 * real['probe_r1']:.3f})\n")
    recon = figures["probe_reconstructed"]
    rows = [["real images", "-", fmt(real["probe_score"], ".3f"), fmt(real["probe_r1"], ".3f"), "-"],
            ["real images through the tokenizer (ceiling)", "-", fmt(recon["probe_score"], ".3f"),
             fmt(recon["probe_r1"], ".3f"), "met" if recon["probe_r1"] >= 0.5 * real["probe_r1"] else "not met"]]
    rows += [[f"generated ({p['sampler']}, {p['steps']} steps)", f"{p['guidance']:g}", fmt(p["probe_score"], ".3f"),
              fmt(p["probe_r1"], ".3f"), "met" if p["goal_met"] else "not met"] for p in figures["probe"]]
    print(markdown_table(["images", "guidance", "probe score", "probe R@1", "goal R@1 >= 1/2 real"], rows))
    print(f"\nSamplers at {proto['base']['steps']} steps, guidance {proto['base']['guidance']:g}\n")
    rows = [[r["sampler"], str(r["nfe"]), fmt(r["ms_per_image"], ".1f"), fmt(r["fid"], ".1f"), fmt(r["kid"], ".4f")]
            for r in figures["samplers"]]
    print(markdown_table(["sampler", "NFE", "ms/image", "FID", "KID"], rows))


def base_text(options: dict) -> str:
    """The profile's sampling setup in words."""
    return f"the profile's sampling ({options['sampler']}, {options['steps']} steps)"


if __name__ == "__main__":
    main()
