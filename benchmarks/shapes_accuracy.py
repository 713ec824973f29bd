"""Compositional accuracy of the shapes generator on prompts from the shapes caption grammar.

The tokenizer and generator come from the real pipeline (`run_with_upstream` up to the
`generator` stage, by default the cpu profile on `shapes`, with any `--set` overrides passed
through, e.g. a tokenizer fix's params). Then, with gen_eval's sampling calls:

* single-object prompts: every colour x kind x size ("a large red circle"), `--per-prompt`
  images each; scored by `tokenline.eval.compositional.score_images`: colour accuracy, and
  colour+shape accuracy (the checker's shape verdict already requires the named colour, so it
  is the share of objects with both right); goal >= 90 %;
* two-object prompts with a relative position ("a small blue star to the left of a large red
  square"), `--pairs` prompts drawn with a seed (distinct colours, kinds, sizes and relation
  uniform); relative position accuracy; goal >= 60 %.

The same accuracies of the real val images (by their object count) are the checker's ceiling,
and those of the val images passed through the tokenizer (encode, decode) the tokenizer's. Tables per
size x kind and per relation follow, with the tokenizer's ceiling on the single-object prompt set
(its per-object accuracies weighted as the prompts weigh them).

`--decoder DIR` decodes with another tokenizer checkpoint: one whose decoder was fine-tuned
with `tokenizer.train.freeze_encoder` from this lineage's tokenizer. The benchmark refuses it
unless it encodes the val images to exactly the lineage tokenizer's latents, so the generator
(trained on those latents) is measured with only the decoder changed.

Stage outputs are reused while fresh. `--seed-from` copies missing data-stage outputs (raw to
captions) from another project root (default: the repo), and with `--seed-models` the tokenizer,
token cache and generator too: the runner retrains any copy whose params or inputs differ, but
it cannot see code changes, so leave `--seed-models` off to measure a changed training code.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks shapes_accuracy [--root DIR]
       [--profile cpu] [--dataset shapes] [--per-prompt 2] [--pairs 200] [--steps N]
       [--guidance G] [--decoder DIR] [--threads 1] [--set key=value ...] [--seed-from DIR ...] [--seed-models]
       [--no-seed]
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

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
    run_stages,
    seed_sources,
    setup_threads,
    stage_inputs,
    timed_generation,
    training_summary,
    write_json,
)
from tokenline.artifacts import read_manifest
from tokenline.layout import output_path

SINGLE_GOAL = 0.90  # single-object colour+shape accuracy
POSITION_GOAL = 0.60  # two-object relative position accuracy


def single_object_prompts(per_prompt: int) -> list[str]:
    """Every colour x kind x size as a one-object caption, each `per_prompt` times."""
    from tokenline.data.shapes import COLORS, KINDS, SIZES, Shape, caption_for

    captions = [caption_for([Shape(kind, color, size, (0, 0, 0, 0))], [])
                for color in COLORS for kind in KINDS for size in SIZES]
    return [caption for caption in captions for _ in range(per_prompt)]


def two_object_prompts(count: int, seed: int) -> list[str]:
    """`count` two-object captions with a relation, drawn from `seed` (distinct colours, as the grammar needs)."""
    from tokenline.data.shapes import (
        COLORS,
        KINDS,
        RELATION_WORDS,
        SIZES,
        Shape,
        caption_for,
    )

    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        colors = rng.sample(sorted(COLORS), 2)
        shapes = [Shape(rng.choice(KINDS), color, rng.choice(sorted(SIZES)), (0, 0, 0, 0)) for color in colors]
        prompts.append(caption_for(shapes, [{"subject": 0, "relation": rng.choice(sorted(RELATION_WORDS)), "object": 1}]))
    return prompts


def val_samples(root: Path, dataset: str) -> list[dict]:
    """Every val sample with its caption from the captions stage."""
    from tokenline.eval.stages import reference_samples_split

    return reference_samples_split(SimpleNamespace(inputs=stage_inputs(root, dataset, "shards", "captions")), "val")


def blank_share(images: torch.Tensor) -> float:
    """Share of images [N, 3, H, W] in [-1, 1] that are blank: over 99.5 % of pixels near white in every channel."""
    white = (images > 0.8).all(dim=1).float().mean(dim=(1, 2))
    return float((white > 0.995).float().mean())


def accuracies(report: dict, count: str) -> dict:
    """The checker's accuracies over the images of one object count ({} when there are none)."""
    return report["by_count"].get(count, {})


def same_latent_decoder(root: Path, dataset: str, tokenizer, decoder_dir: Path, images: torch.Tensor):
    """The tokenizer at `decoder_dir`, after checking that it encodes `images` exactly as `tokenizer` does."""
    from tokenline.generator.checkpoint import check_pairing
    from tokenline.tokenizer.model import Tokenizer1D

    check_pairing(output_path(root, dataset, "generator"), decoder_dir, read_manifest(decoder_dir)["content_hash"])
    decoder = Tokenizer1D.from_checkpoint(decoder_dir)
    if tokenizer.config.text_dim or decoder.config.text_dim:
        raise SystemExit("--decoder supports tokenizers without text conditioning only")
    with torch.no_grad():
        same = torch.equal(tokenizer.encode(images).latents, decoder.encode(images).latents)
    if not same:
        raise SystemExit(f"--decoder {decoder_dir} encodes the val images to other latents than "
                         f"{output_path(root, dataset, 'tokenizer')}: its encoder was trained too, so the "
                         "generator does not model its latents (fine-tune with tokenizer.train.freeze_encoder)")
    return decoder


def measure(root: Path, params, dataset: str, per_prompt: int, pairs: int, steps: int | None,
            guidance: float | None, decoder_dir: Path | None = None) -> dict:
    """Generate for both prompt sets and score them, with the real and reconstructed val images as ceilings."""
    from tokenline.eval.compositional import score_images
    from tokenline.generator.generate import SamplingOptions
    from tokenline.text.captions import cached_text_encoder
    from tokenline.tokenizer.pixels import samples_to_batch, tensor_to_image

    generator, tokenizer = load_pair(root, dataset)
    val = val_samples(root, dataset)
    real_images = samples_to_batch(val, tokenizer.config.image_size)
    if decoder_dir is not None:
        tokenizer = same_latent_decoder(root, dataset, tokenizer, decoder_dir, real_images)
    encoder = cached_text_encoder(root, params)
    options = SamplingOptions(**params.generator.sample.model_dump())
    options = replace(options, steps=steps or options.steps,
                      guidance=options.guidance if guidance is None else guidance)
    sets = {"single": single_object_prompts(per_prompt), "two": two_object_prompts(pairs, options.seed)}
    generated, blank = {}, {}
    for name, prompts in sets.items():
        encoder.encode(prompts)  # warm the embedding cache
        images, ms, nfe = timed_generation(generator, tokenizer, prompts, encoder, options)
        generated[name] = {**score_images([tensor_to_image(i) for i in images], prompts), "ms_per_image": ms, "nfe": nfe}
        blank[f"generated_{name}"] = blank_share(images)
        print(f"{name}: {len(prompts)} images, {ms:.1f} ms/image", flush=True)
    captions = [s["caption"] for s in val]
    real = score_images([s["image"] for s in val], captions)
    recon_images = reconstruct(tokenizer, real_images, captions, encoder)
    recon = score_images([tensor_to_image(i) for i in recon_images], captions)
    return {
        "generated": generated, "real_val": real, "reconstructed_val": recon,
        "blank_share": {**blank, "real_val": blank_share(real_images), "reconstructed_val": blank_share(recon_images)},
        "prompts": {name: {"count": len(p), "examples": p[:: max(1, len(p) // 4)][:4]} for name, p in sets.items()},
        "protocol": {"sampling": options.describe(), "objective": generator.config.objective,
                     "per_prompt": per_prompt, "pairs": pairs, "val_images": len(val),
                     "decoder": None if decoder_dir is None else str(decoder_dir),
                     "threads": torch.get_num_threads()},
    }


def prompt_weighted_ceiling(generated_single: dict, recon: dict) -> float:
    """The tokenizer's shape accuracy per "size kind" averaged with the single-object prompts' weights.

    The prompt set weighs every size x kind equally, the val images do not, so this (not the val
    figure) estimates what the generated single-object accuracy can reach through this tokenizer
    (an estimate, not a bound: generated latents need not look like encoded ones).
    """
    weights = {name: group["objects"] for name, group in generated_single["by_object"].items()}
    ceiling = {name: group["shapes_shape_acc"] for name, group in recon["by_object"].items()}
    return sum(weights[name] * ceiling.get(name, 0.0) for name in weights) / sum(weights.values())


def print_breakdowns(generated: dict, recon: dict, ceiling: float) -> None:
    """Shape accuracy per size x kind, with the tokenizer's prompt-weighted `ceiling`, and position accuracy per relation."""
    single, two = generated["single"], generated["two"]
    rows = [[name, f"{group['shapes_shape_acc']:.3f} ({group['objects']})",
             fmt(recon["by_object"].get(name, {}).get("shapes_shape_acc"), ".3f")]
            for name, group in single["by_object"].items()]
    print("\n" + markdown_table(["single object", "generated colour+shape (objects)", "val through the tokenizer"], rows))
    print(f"tokenizer ceiling on the single-object prompts (each size x kind weighted as prompted): "
          f"{ceiling:.3f}")
    rows = [[name, f"{group['shapes_position_acc']:.3f} ({group['relations']})",
             fmt(recon["by_relation"].get(name, {}).get("shapes_position_acc"), ".3f")]
            for name, group in two["by_relation"].items()]
    print("\n" + markdown_table(["relation", "generated position (relations)", "val through the tokenizer"], rows) + "\n")


def main() -> None:
    """Train through the pipeline, measure, print the accuracy table with the goals and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, WORK / "shapes_accuracy", "shapes")
    parser.add_argument("--per-prompt", type=int, default=2, help="images per single-object prompt (80 prompts)")
    parser.add_argument("--pairs", type=int, default=200, help="two-object prompts")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps / rounds (default generator.sample.steps)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default generator.sample.guidance)")
    parser.add_argument("--decoder", type=Path, default=None,
                        help="decode with this tokenizer checkpoint (a freeze_encoder fine-tune of the lineage's)")
    parser.add_argument("--seed-models", action="store_true",
                        help="also copy tokenizer, token cache and generator from --seed-from (not only the data stages)")
    args = parser.parse_args()
    setup_threads(args.threads)

    seeded_stages = ["generator"] if args.seed_models else ["captions"]
    copied = prepare_root(args.root, seed_sources(args), args.dataset, seeded_stages)
    params = bench_params(args.root, args.profile, args.dataset, args.overrides)
    pipeline = run_stages(args.root, params, args.dataset, ["generator"])
    print(f"pipeline: seeded {copied or 'nothing'}, ran {pipeline['ran'] or 'nothing (fresh)'} "
          f"in {pipeline['wall_s']:.0f} s", flush=True)

    started = time.perf_counter()
    figures = measure(args.root, params, args.dataset, args.per_prompt, args.pairs, args.steps, args.guidance,
                      args.decoder)
    figures["single_prompt_ceiling"] = prompt_weighted_ceiling(figures["generated"]["single"], figures["reconstructed_val"])
    figures |= {"measure_wall_s": time.perf_counter() - started, "pipeline": pipeline, "seeded": copied,
                "profile": args.profile, "dataset": args.dataset, "overrides": args.overrides,
                "generator_training": training_summary(args.root, args.dataset, "generator"),
                "tokenizer_training": read_manifest(output_path(args.root, args.dataset, "tokenizer"))["metrics"]}
    write_json(args.root / "shapes_accuracy.json", figures)

    t, proto = params.tokenizer, figures["protocol"]
    s = proto["sampling"]
    print(f"\n{args.dataset} at {params.data.resolution} px ({args.profile} profile{', ' if args.overrides else ''}"
          f"{' '.join(args.overrides)}), tokenizer {t.quantizer} K = {t.num_tokens}, {t.train.steps} steps; "
          f"{proto['objective']} generator, {figures['generator_training']['steps']} steps; sampling "
          f"{s['sampler'] if proto['objective'] == 'flow' else 'masked'} {s['steps']} steps, guidance {s['guidance']:g}; "
          f"{len(single_object_prompts(1))} single-object prompts x {args.per_prompt}, {args.pairs} two-object "
          f"prompts; ceilings on {proto['val_images']} val images; {proto['threads']} thread(s)"
          f"{'; decoder ' + proto['decoder'] + ' (same latents)' if proto['decoder'] else ''}. "
          f"Figures: {args.root / 'shapes_accuracy.json'}\n")
    g, real, recon = figures["generated"], figures["real_val"], figures["reconstructed_val"]
    rows = []
    for label, single, two in (("generated", g["single"], g["two"]),
                               ("real val images (checker ceiling)", accuracies(real, "1"), accuracies(real, "2")),
                               ("val images through the tokenizer", accuracies(recon, "1"), accuracies(recon, "2"))):
        rows.append([label, f"{single.get('images', 0)} / {two.get('images', 0)}",
                     fmt(single.get("shapes_color_acc"), ".3f"), fmt(single.get("shapes_shape_acc"), ".3f"),
                     fmt(single.get("shapes_count_acc"), ".3f"), fmt(two.get("shapes_position_acc"), ".3f"),
                     fmt(two.get("shapes_color_acc"), ".3f")])
    print(markdown_table(["images", "single / two-object images", "single: colour", "single: colour+shape",
                          "single: count", "two: position", "two: colours"], rows))
    single, position = g["single"]["shapes_shape_acc"], g["two"]["shapes_position_acc"]
    print(f"\ngoal single-object colour+shape >= {SINGLE_GOAL:.0%}: {single:.1%} -> "
          f"{'met' if single >= SINGLE_GOAL else 'not met'}")
    print(f"goal two-object relative position >= {POSITION_GOAL:.0%}: {position:.1%} -> "
          f"{'met' if position >= POSITION_GOAL else 'not met'}")
    print_breakdowns(g, recon, figures["single_prompt_ceiling"])
    b = figures["blank_share"]
    print(f"blank images (> 99.5 % near-white pixels): generated single {b['generated_single']:.1%}, two "
          f"{b['generated_two']:.1%}; real val {b['real_val']:.1%}; val through the tokenizer {b['reconstructed_val']:.1%}")


if __name__ == "__main__":
    main()
