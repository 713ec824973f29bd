"""The tokenizer stages of the lineage: `tokenizer` (train), `tokens` (cache), `recon_eval` (measure)."""

from __future__ import annotations

import shutil

import numpy as np
import torch
from PIL import Image

from tokenline.artifacts import atomic_write_json, read_manifest
from tokenline.data.stages import iter_shard_samples
from tokenline.model_checkpoint import start_from_checkpoint
from tokenline.pipeline import INIT, StageContext, StageResult, work_path
from tokenline.tokenizer.caption_text import CaptionTexts, cached_text_encoder, caption_map, params_text_encoder, text_cache_dir
from tokenline.tokenizer.model import Tokenizer1D
from tokenline.tokenizer.pixels import samples_to_batch, tensor_to_image
from tokenline.training import seed_everything

TRAINING = "training.json"
RECONSTRUCTIONS = "reconstructions.png"


@torch.no_grad()
def reconstruction_pairs(model: Tokenizer1D, ctx: StageContext, texts: CaptionTexts | None, count: int) -> list[tuple[Image.Image, str]]:
    """(original, caption), (reconstruction, caption), ... for the first `count` val (else train) images."""
    samples = []
    for split in ("val", "train"):
        samples += [s for _, s in zip(range(count - len(samples)), iter_shard_samples(ctx.inputs["shards"], split))]
    if not samples:
        return []
    images = samples_to_batch(samples, model.config.image_size)
    text = texts([s["key"] for s in samples]) if texts is not None else None
    reconstructions, _ = model.eval()(images, text)
    pairs = []
    for sample, reconstruction in zip(samples, reconstructions):
        pairs += [(sample["image"], sample["caption"]), (tensor_to_image(reconstruction), "reconstruction")]
    return pairs


def _caption_texts(ctx: StageContext, length: int) -> CaptionTexts | None:
    if not ctx.params.tokenizer.text_conditioning:
        return None
    encoder = params_text_encoder(ctx.params)
    return CaptionTexts(caption_map(ctx.inputs["captions"]), encoder, text_cache_dir(ctx.root), length)


# --------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------


def tokenizer(ctx: StageContext) -> StageResult:
    """Train the tokenizer params describe; write its EMA checkpoint and a training summary."""
    from tokenline.tokenizer.spec import tokenizer_config
    from tokenline.tokenizer.train import CHECKPOINT, train_tokenizer

    p = ctx.params.tokenizer
    texts = _caption_texts(ctx, p.text_tokens)
    text_dim = texts.cache.encoder.token_dim if texts is not None else 0
    seed_everything(p.train.seed)  # the initial weights are drawn here: two fresh runs start alike
    model = Tokenizer1D(tokenizer_config(ctx.params, text_dim))
    work = work_path(ctx.root, ctx.dataset, "tokenizer")
    # A fresh run leaves an old state folder where it is (it reads nothing from it) until its own
    # first state replaces it: a fresh run that fails early cannot destroy a run worth resuming.
    if not ctx.resume:
        if INIT in ctx.inputs:  # fine-tuning (with freeze_encoder: the decoder alone, latents kept)
            start_from_checkpoint(model, ctx.inputs[INIT], Tokenizer1D.from_checkpoint, "tokenizer")
    summary = train_tokenizer(
        model, ctx.inputs["shards"], work, p.train,
        resume=ctx.resume,
        force=ctx.force, log_fn=ctx.tracker.log_metrics, text_fn=texts,
    )
    out = ctx.outputs["tokenizer"]
    for file in sorted((work / CHECKPOINT).iterdir()):
        shutil.copy2(file, out / file.name)
    trained = Tokenizer1D.from_checkpoint(out)
    atomic_write_json(out / TRAINING, {
        **summary,
        "train": p.train.to_dict(),
        "text_encoder": texts.cache.encoder.describe() if texts is not None else None,
        "num_params": trained.num_params(),
        "init": str(ctx.inputs[INIT]) if INIT in ctx.inputs else None,  # resumed too: the weights descend from it
    })
    pairs = reconstruction_pairs(trained, ctx, texts, max(1, ctx.params.tracking.contact_sheet // 2))
    if pairs:
        from tokenline.contact_sheet import contact_sheet

        ctx.tracker.log_image(contact_sheet([image for image, _ in pairs]), f"samples/{RECONSTRUCTIONS}")
    metrics = {key: float(summary[key]) for key in ("final_loss", "images_per_s", "wall_time_s")}
    return StageResult(counts={"steps": int(summary["steps"]), "params": trained.num_params()}, metrics=metrics, samples=pairs)


# --------------------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------------------


def tokens(ctx: StageContext) -> StageResult:
    """Encode every shard once into the token cache, keyed by the tokenizer checkpoint's hash."""
    from tokenline.tokenizer.token_cache import TokenCache, write_token_cache

    tokenizer_dir = ctx.inputs["tokenizer"]
    tokenizer_hash = read_manifest(tokenizer_dir)["content_hash"]
    model = Tokenizer1D.from_checkpoint(tokenizer_dir)
    encoder = cached_text_encoder(ctx.root, ctx.params)
    out = ctx.outputs["tokens"]
    counts = write_token_cache(
        model, ctx.inputs["shards"], ctx.inputs["captions"], out, tokenizer_hash,
        text_encoder=encoder, text_tokens=ctx.params.tokenizer.text_tokens,
        batch_size=ctx.params.tokens.batch_size,
    )
    # Preview: images decoded from the cache itself, so a broken cache shows at a glance.
    samples = []
    cache = TokenCache(out, "train", expect_tokenizer_hash=tokenizer_hash)
    rows = [cache[i] for i in range(min(len(cache), ctx.params.tracking.contact_sheet))]
    if rows:
        latents = torch.stack([row["latents"] for row in rows])
        text = None
        if model.config.text_dim:
            length = model.config.text_tokens
            text = (torch.stack([r["text_tokens"][:length] for r in rows]), torch.stack([r["text_mask"][:length] for r in rows]))
        with torch.no_grad():
            decoded = model.decode(latents, text)
        samples = [(tensor_to_image(image), caption) for image, caption in zip(decoded, cache.captions)]
    return StageResult(counts=counts, samples=samples)


# --------------------------------------------------------------------------------------
# recon_eval
# --------------------------------------------------------------------------------------


def recon_eval(ctx: StageContext) -> StageResult:
    """PSNR, SSIM, rFID, tokens/bits per image and code usage of the tokenizer on the val split."""
    from tokenline.contact_sheet import png_bytes
    from tokenline.eval.reconstruction import evaluate_reconstruction
    from tokenline.artifacts import atomic_write_bytes

    options = ctx.params.recon_eval
    tokenizer_dir = ctx.inputs["tokenizer"]
    model = Tokenizer1D.from_checkpoint(tokenizer_dir)
    texts = _caption_texts(ctx, model.config.text_tokens) if model.config.text_dim else None
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
