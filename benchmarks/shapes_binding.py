"""Does the shapes generator bind a relation to the right noun, and at which noise level is layout decided?

Two diagnostics on the lineage `shapes_accuracy.py` trains (same `--root`, `--set`s), each
comparing a two-object caption with its swap (`swapped_caption`: "a red circle above a blue
square" -> "a blue square above a red circle", the same words and the opposite layout):

* loss gap: the flow loss of training scenes under the true and under the swapped caption at
  fixed t (the same noise for both). A generator that binds fits the true caption clearly better;
  one that reads a bag of words fits both alike.
* re-noising (SDEdit): val scenes noised to t0 and denoised (Euler, guided) under the true and
  under the swapped caption, relative position scored against the caption used. Where the swapped
  caption scores near 0 the noised latents already fix which colour sits where and the caption
  cannot move it; at t0 = 1 (pure noise) both runs are plain generation.

Usage: OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks shapes_binding --root DIR [--set key=value ...]
       [--scenes 100] [--guidance G] [--steps 25] [--decoder DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import (
    WORK,
    add_common_arguments,
    bench_params,
    load_pair,
    markdown_table,
    prepare_root,
    run_stages,
    seed_sources,
    setup_threads,
    write_json,
)
from benchmarks.shapes_accuracy import same_latent_decoder, val_samples
from tokenline.layout import output_path

LOSS_TIMES = (0.1, 0.3, 0.5, 0.7, 0.85, 0.95)
RENOISE_TIMES = (0.3, 0.5, 0.7, 0.85, 1.0)


def two_object_rows(captions: list[str], count: int) -> tuple[list[int], list[str]]:
    """The first `count` rows whose caption relates exactly two objects, and their swapped captions."""
    from tokenline.data.shapes_captions import parse_caption, swapped_caption

    rows, swapped = [], []
    for row, caption in enumerate(captions):
        swap = swapped_caption(caption)
        if swap is not None and len(parse_caption(caption).objects) == 2:
            rows.append(row)
            swapped.append(swap)
        if len(rows) == count:
            break
    return rows, swapped


@torch.no_grad()
def loss_gaps(generator, latents: torch.Tensor, true_text, swapped_text, draws: int = 4) -> list[dict]:
    """Flow loss under the true and the swapped caption at each of LOSS_TIMES, averaged over `draws` noises."""
    x0 = generator.normalize(latents)
    noise_source = torch.Generator().manual_seed(0)
    rows = []
    for t_value in LOSS_TIMES:
        t = torch.full((len(x0),), t_value)
        losses = {"true": 0.0, "swapped": 0.0}
        for _ in range(draws):
            noise = torch.randn(x0.shape, generator=noise_source)
            x_t = (1 - t_value) * x0 + t_value * noise
            for name, text in (("true", true_text), ("swapped", swapped_text)):
                losses[name] += torch.nn.functional.mse_loss(generator(x_t, t, text), noise - x0).item() / draws
        rows.append({"t": t_value, **losses, "gap": losses["swapped"] - losses["true"]})
    return rows


@torch.no_grad()
def denoise_from(generator, x_t: torch.Tensor, t0: float, text, guidance: float, steps: int) -> torch.Tensor:
    """Guided Euler from x_t at time t0 down to 0, with the step size of `steps` steps from t = 1 (standardized latents)."""
    from tokenline.generator.samplers import guided_velocity

    velocity = guided_velocity(lambda x, t: generator(x, t, text), lambda x, t: generator(x, t, None), guidance)
    times = torch.linspace(t0, 0.0, max(1, round(steps * t0)) + 1)
    for t, t_next in zip(times[:-1], times[1:]):
        x_t = x_t + (t_next - t) * velocity(x_t, torch.full((len(x_t),), float(t)))
    return x_t


def renoised_positions(generator, decoder, latents: torch.Tensor, captions: list[str], true_text, swapped_text,
                       swapped: list[str], guidance: float, steps: int) -> list[dict]:
    """Relative position accuracy after re-noising to each of RENOISE_TIMES, under either caption."""
    from tokenline.eval.compositional import score_images
    from tokenline.tokenizer.pixels import tensor_to_image

    x0 = generator.normalize(latents)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    rows = []
    for t0 in RENOISE_TIMES:
        x_t = (1 - t0) * x0 + t0 * noise
        row = {"t0": t0}
        for name, text, prompts in (("true", true_text, captions), ("swapped", swapped_text, swapped)):
            with torch.no_grad():
                images = decoder.decode(generator.denormalize(denoise_from(generator, x_t, t0, text, guidance, steps)))
            report = score_images([tensor_to_image(image) for image in images], prompts)
            row[name] = report["shapes_position_acc"]
            row[f"{name}_colour"] = report["shapes_color_acc"]
        rows.append(row)
    return rows


def main() -> None:
    """Measure both diagnostics on the lineage's generator and print them as tables."""
    from tokenline.generator.generate import encode_prompts
    from tokenline.text.captions import cached_text_encoder
    from tokenline.tokenizer.pixels import samples_to_batch
    from tokenline.tokenizer.token_cache import TokenCache

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, WORK / "shapes_accuracy", "shapes")
    parser.add_argument("--scenes", type=int, default=100, help="two-object scenes per diagnostic")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default generator.sample.guidance)")
    parser.add_argument("--steps", type=int, default=25, help="Euler steps from t0 = 1 (fewer from smaller t0, same step size)")
    parser.add_argument("--decoder", type=Path, default=None,
                        help="decode with this tokenizer checkpoint (a freeze_encoder fine-tune of the lineage's)")
    args = parser.parse_args()
    setup_threads(args.threads)
    prepare_root(args.root, seed_sources(args), args.dataset, ["captions"])
    params = bench_params(args.root, args.profile, args.dataset, args.overrides)
    pipeline = run_stages(args.root, params, args.dataset, ["generator"])
    print(f"pipeline: ran {pipeline['ran'] or 'nothing (fresh)'} in {pipeline['wall_s']:.0f} s", flush=True)
    started = time.perf_counter()

    generator, tokenizer = load_pair(args.root, args.dataset)
    generator.eval()
    encoder = cached_text_encoder(args.root, params)
    guidance = params.generator.sample.guidance if args.guidance is None else args.guidance
    text_tokens = generator.config.text_tokens

    cache = TokenCache(output_path(args.root, args.dataset, "tokens"), "train")
    rows, swapped = two_object_rows(cache.captions, args.scenes)
    latents = cache.rows(rows)["latents"]
    true_text, _ = encode_prompts([cache.captions[r] for r in rows], encoder, text_tokens)
    swapped_text, _ = encode_prompts(swapped, encoder, text_tokens)
    gaps = loss_gaps(generator, latents, true_text, swapped_text)

    val = val_samples(args.root, args.dataset)
    val_rows, val_swapped = two_object_rows([s["caption"] for s in val], args.scenes)
    val_captions = [val[r]["caption"] for r in val_rows]
    images = samples_to_batch([val[r] for r in val_rows], tokenizer.config.image_size)
    decoder = tokenizer if args.decoder is None else same_latent_decoder(args.root, args.dataset, tokenizer,
                                                                         args.decoder, images)
    with torch.no_grad():
        val_latents = tokenizer.encode(images).latents
    val_true_text, _ = encode_prompts(val_captions, encoder, text_tokens)
    val_swapped_text, _ = encode_prompts(val_swapped, encoder, text_tokens)
    positions = renoised_positions(generator, decoder, val_latents, val_captions, val_true_text, val_swapped_text,
                                   val_swapped, guidance, args.steps)

    figures = {"loss_gap": gaps, "renoised_position": positions, "train_scenes": len(rows), "val_scenes": len(val_rows),
               "guidance": guidance, "steps": args.steps, "overrides": args.overrides,
               "decoder": None if args.decoder is None else str(args.decoder),
               "measure_wall_s": time.perf_counter() - started}
    write_json(args.root / "shapes_binding.json", figures)
    print(f"\nflow loss of {len(rows)} two-object training scenes under the true and the swapped caption "
          "(4 noise draws per t):\n")
    print(markdown_table(["t", "true caption", "swapped caption", "gap", "gap / loss"],
                         [[f"{g['t']:g}", f"{g['true']:.4f}", f"{g['swapped']:.4f}", f"{g['gap']:+.4f}",
                           f"{g['gap'] / g['true']:+.1%}"] for g in gaps]))
    print(f"\n{len(val_rows)} two-object val scenes noised to t0 and denoised (guidance {guidance:g}, Euler over "
          f"{args.steps} steps from t0 = 1), relative position scored against the caption used:\n")
    print(markdown_table(["t0", "true caption: position", "swapped caption: position", "colours found (true / swapped)"],
                         [[f"{p['t0']:g}", f"{p['true']:.2f}", f"{p['swapped']:.2f}",
                           f"{p['true_colour']:.2f} / {p['swapped_colour']:.2f}"] for p in positions]))
    print(f"\nFigures: {args.root / 'shapes_binding.json'} ({figures['measure_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
