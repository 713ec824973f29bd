"""Experiment, not yet a pipeline stage: teach a trained shapes generator to bind relations with swapped twins.

`shapes_binding.py` shows the lineage's generator reads captions as bags of words: which colour
goes where is settled at t > 0.85, where a caption and its swap fit alike. This script fine-tunes
that generator (its exported EMA weights, or `--init` weights this script saved) with:

* twins: every training scene whose first two objects can trade places (same sizes and kinds,
  centres exchanged, still inside the image, apart and in the stated relations) is rendered
  again with them exchanged, encoded with the lineage's tokenizer and captioned with its
  original's `swapped_caption`. Each twin's caption is the swap of its original's, and the
  other way round, so both captions of a pair are real captions of real scenes;
* a swap term: for rows with a twin, at t >= 0.5 and not caption-dropped, the flow loss under
  the twin's caption (the same x_t and target) must exceed the loss under the row's own caption:
  weight * softplus(-(loss_swapped - loss_true) / temperature). With made-up swaps as negatives
  instead, the model learns to spot made-up captions and position does not move (README);
* `--time-mean` shifts the logit-normal timesteps towards noise, where layout is decided.

Then it samples the benchmark's prompts (`shapes_accuracy.py`: 160 single-object, 200 two-object,
the lineage's sampler at `--guidance`) and prints the checker's accuracies. Weights go to
OUT/generator.pt, figures to OUT/result.json. The lineage itself is left untouched.

Usage: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/shapes_twins_finetune.py --root DIR --out DIR
       [--decoder DIR] [--init OUT/generator.pt] [--steps 3000] [--weight 3] [--temperature 0.02]
       [--time-mean 1.0] [--lr 1e-4] [--guidance 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_sweeps import bench_params, load_pair, setup_threads  # noqa: E402
from shapes_accuracy import single_object_prompts, two_object_prompts  # noqa: E402

from tokenline.data.shapes import (  # noqa: E402
    MIN_SEPARATION,
    Shape,
    ShapesSource,
    draw_shape,
    overlaps,
    relations_between,
)
from tokenline.eval.compositional import score_images, swapped_caption  # noqa: E402
from tokenline.generator.generate import SamplingOptions, encode_prompts, sample_tokens, tokens_to_images  # noqa: E402
from tokenline.generator.model import TextBatch  # noqa: E402
from tokenline.generator.objectives import logit_normal_times  # noqa: E402
from tokenline.pipeline import output_path  # noqa: E402
from tokenline.tokenizer.caption_text import cached_text_encoder  # noqa: E402
from tokenline.tokenizer.model import Tokenizer1D  # noqa: E402
from tokenline.tokenizer.pixels import image_to_tensor, tensor_to_image  # noqa: E402
from tokenline.tokenizer.token_cache import TokenCache  # noqa: E402
from tokenline.training import EMA  # noqa: E402

NEGATIVE_MIN_T = 0.5  # rows below this t take no part in the swap term: the noised latents show the layout
BATCH = 64
SAMPLE_CHUNK = 50  # prompts per sampling call; each call starts from the same seed


def twin_scene(record, resolution: int) -> Image.Image | None:
    """The scene with its first two objects' centres exchanged, or None where that breaks the scene's rules."""
    meta = record.metadata
    if meta["count"] < 2:
        return None
    shapes = [Shape(o["kind"], o["color"], o["size"], tuple(o["bbox"])) for o in meta["objects"]]

    def moved(shape: Shape, centre: tuple[float, float]) -> Shape:
        side = shape.bbox[2] - shape.bbox[0]
        x0, y0 = round(centre[0] - side / 2), round(centre[1] - side / 2)
        return Shape(shape.kind, shape.color, shape.size, (x0, y0, x0 + side, y0 + side))

    first, second = shapes[0], shapes[1]
    twin = [moved(first, second.center), moved(second, first.center), *shapes[2:]]
    gap, margin = max(1, resolution // 32), MIN_SEPARATION * resolution
    if any(min(s.bbox) < 0 or max(s.bbox) > resolution for s in twin):
        return None
    if any(overlaps(a.bbox, b.bbox, gap) for i, a in enumerate(twin) for b in twin[i + 1:]):
        return None
    # The twin's caption names the second object first: it relates twin[1] to twin[0], and a third to twin[0].
    relations = meta["relations"]
    if relations[0]["relation"] not in relations_between(twin[1], twin[0], margin):
        return None
    if len(relations) > 1 and relations[1]["relation"] not in relations_between(twin[2], twin[0], margin):
        return None
    image = Image.new("RGB", (resolution, resolution), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for shape in twin:
        draw_shape(draw, shape)
    return image


def training_set(root: Path, params, tokenizer, encoder, text_tokens: int):
    """(latents, captions as a TextBatch, partner row or -1) for the cache rows followed by their twins."""
    cache = TokenCache(output_path(root, "shapes", "tokens"), "train")
    spec = params.datasets["shapes"]
    source = ShapesSource(tokenizer.config.image_size, spec.size or 2000, spec.seed)
    originals, images, captions = [], [], []
    for row, key in enumerate(cache.keys):
        record = source.record(int(key.rsplit("_", 1)[1]))
        if record.caption != cache.captions[row]:
            raise SystemExit(f"{key}: the shapes source gives {record.caption!r}, the cache holds "
                             f"{cache.captions[row]!r}; pass the lineage's --set datasets.shapes.*")
        image = twin_scene(record, tokenizer.config.image_size)
        if image is not None:
            originals.append(row)
            images.append(image_to_tensor(image))
            captions.append(swapped_caption(record.caption))
    with torch.no_grad():
        twin_latents = torch.cat([tokenizer.encode(torch.stack(images[i:i + 256])).latents
                                  for i in range(0, len(images), 256)])
    twin_text, _ = encode_prompts(captions, encoder, text_tokens)
    base = cache.rows(list(range(len(cache))))
    n = len(cache)
    text = TextBatch(torch.cat([base["text_tokens"], twin_text.states]), torch.cat([base["text_mask"], twin_text.mask]),
                     torch.cat([base["text_pooled"], twin_text.pooled]))
    partner = torch.full((n + len(originals),), -1, dtype=torch.long)
    for j, row in enumerate(originals):
        partner[row], partner[n + j] = n + j, row
    return torch.cat([base["latents"], twin_latents]), text, partner


def concat(a: TextBatch, b: TextBatch) -> TextBatch:
    """Rows of a, then rows of b."""
    return TextBatch(torch.cat([a.states, b.states]), torch.cat([a.mask, b.mask]), torch.cat([a.pooled, b.pooled]))


def fine_tune(generator, latents, text: TextBatch, partner, args) -> None:
    """`args.steps` AdamW steps of flow loss plus the swap term; leaves the EMA weights in `generator`."""
    generator.train()
    ema = EMA(generator, 0.995)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=args.lr)
    rows_source = torch.Generator().manual_seed(1)
    started, flow_sum, gap_sum, gap_count = time.perf_counter(), 0.0, 0.0, 0
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, len(latents), (BATCH,), generator=rows_source)
        batch_text = text.select(rows)
        drop = torch.rand(BATCH) < 0.1
        x0 = generator.normalize(latents[rows])
        t = logit_normal_times(BATCH, args.time_mean)
        noise = torch.randn_like(x0)
        x_t, target = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise, noise - x0
        part = (partner[rows] >= 0) & ~drop & (t >= NEGATIVE_MIN_T)
        negatives = text.select(partner[rows][part])
        velocity = generator(torch.cat([x_t, x_t[part]]), torch.cat([t, t[part]]), concat(batch_text, negatives),
                             torch.cat([drop, torch.zeros(int(part.sum()), dtype=torch.bool)]))
        errors = (velocity - torch.cat([target, target[part]])).pow(2).mean(dim=(1, 2))
        true_rows, swapped_rows = errors[:BATCH], errors[BATCH:]
        loss = true_rows.mean()
        if part.any():
            gap = swapped_rows - true_rows[part]
            loss = loss + args.weight * F.softplus(-gap / args.temperature).mean()
            gap_sum, gap_count = gap_sum + gap.mean().item(), gap_count + 1
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(generator.parameters(), 1.0)
        optimizer.step()
        ema.update(generator, step)
        flow_sum += true_rows.mean().item()
        if step % 100 == 0:
            print(f"step {step}: flow loss {flow_sum / 100:.4f}, swap gap {gap_sum / max(1, gap_count):+.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            flow_sum, gap_sum, gap_count = 0.0, 0.0, 0
    ema.copy_to(generator)


def score(generator, decoder, encoder, options) -> dict:
    """The checker's accuracies on the benchmark's single- and two-object prompts."""
    result = {}
    for name, prompts in (("single", single_object_prompts(2)), ("two", two_object_prompts(200, options.seed))):
        text, _ = encode_prompts(prompts, encoder, generator.config.text_tokens)
        chunks = []
        for start in range(0, len(prompts), SAMPLE_CHUNK):
            tokens, _ = sample_tokens(generator, text.select(torch.arange(start, min(start + SAMPLE_CHUNK, len(prompts)))),
                                      options)
            with torch.no_grad():
                chunks.append(tokens_to_images(tokens, decoder))
        images = torch.cat(chunks)
        report = score_images([tensor_to_image(image) for image in images], prompts)
        result[name] = {key: report[key] for key in ("shapes_color_acc", "shapes_shape_acc", "shapes_position_acc")}
    return result


def main() -> None:
    """Build the twins, fine-tune, sample and print the accuracies."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="a shapes_accuracy.py lineage root (generator trained)")
    parser.add_argument("--out", type=Path, required=True, help="folder for generator.pt and result.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="the lineage's params overrides")
    parser.add_argument("--decoder", type=Path, default=None, help="decode with this tokenizer (a freeze_encoder fine-tune)")
    parser.add_argument("--init", type=Path, default=None, help="start from weights this script saved")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--weight", type=float, default=3.0, help="weight of the swap term")
    parser.add_argument("--temperature", type=float, default=0.02, help="loss-gap scale of the softplus")
    parser.add_argument("--time-mean", type=float, default=1.0, help="logit-normal timestep mean (0: the lineage's)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    params = bench_params(args.root, "cpu", "shapes", args.overrides)
    generator, tokenizer = load_pair(args.root, "shapes")
    if args.init is not None:
        generator.load_state_dict(torch.load(args.init, weights_only=True))
    decoder = tokenizer if args.decoder is None else Tokenizer1D.from_checkpoint(args.decoder)
    encoder = cached_text_encoder(args.root, params)
    latents, text, partner = training_set(args.root, params, tokenizer, encoder, generator.config.text_tokens)
    print(f"{int((partner >= 0).sum()) // 2} twins added to {len(latents) - int((partner >= 0).sum()) // 2} "
          "cache rows", flush=True)
    if args.steps:
        fine_tune(generator, latents, text, partner, args)
    torch.save(generator.state_dict(), args.out / "generator.pt")
    options = replace(SamplingOptions(**params.generator.sample.model_dump()), guidance=args.guidance)
    result = score(generator.eval(), decoder, encoder, options)
    (args.out / "result.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **result}))
    for name, accuracies in result.items():
        print(name, {key: round(value, 3) for key, value in accuracies.items() if value is not None}, flush=True)


if __name__ == "__main__":
    main()
