"""The tokenizer stages of the lineage: `tokenizer` (train), `tokens` (cache), `recon_eval` (measure)."""

from __future__ import annotations

import dataclasses
import shutil

import torch
from PIL import Image

from tokenline.artifacts import atomic_write_json, read_manifest
from tokenline.contact_sheet import contact_sheet
from tokenline.data.shards import iter_shard_samples
from tokenline.layout import work_path
from tokenline.model_checkpoint import read_config, start_from_checkpoint
from tokenline.stage import INIT, AssetCheck, Stage, StageContext, StageResult
from tokenline.text.captions import (
    CaptionTexts,
    cached_text_encoder,
    caption_map,
    params_text_encoder,
    text_cache_dir,
)
from tokenline.tokenizer import checks as tokenizer_checks
from tokenline.tokenizer.model import Tokenizer1D, TokenizerConfig, check_teacher_fits
from tokenline.tokenizer.pixels import samples_to_batch, tensor_to_image
from tokenline.tokenizer.spec import teacher_config, tokenizer_config
from tokenline.tokenizer.token_cache import TokenCache
from tokenline.tokenizer.token_cache_writer import write_token_cache
from tokenline.tokenizer.train import CHECKPOINT, train_tokenizer
from tokenline.training import seed_everything

TRAINING = "training.json"
RECONSTRUCTIONS = "reconstructions.png"  # the preview grid of originals over reconstructions


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


def caption_texts(ctx: StageContext, length: int) -> CaptionTexts | None:
    if not ctx.params.tokenizer.text_conditioning:
        return None
    encoder = params_text_encoder(ctx.params)
    return CaptionTexts(caption_map(ctx.inputs["captions"]), encoder, text_cache_dir(ctx.root), length)


# --------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------


def tokenizer(ctx: StageContext) -> StageResult:
    """Train the tokenizer params describe; write its EMA checkpoint and a training summary."""
    p = ctx.params.tokenizer
    texts = caption_texts(ctx, p.text_tokens)
    text_dim = texts.cache.encoder.token_dim if texts is not None else 0
    teacher = _teacher(ctx) if p.train.proxy_steps else None
    seed_everything(p.train.seed)  # the initial weights are drawn here: two fresh runs start alike
    config = tokenizer_config(ctx.params, text_dim)
    if teacher is not None:
        config = _with_teacher(config, teacher, ctx)
    model = Tokenizer1D(config)
    if teacher is not None:
        model.pixel_decoder.load_teacher(teacher)
    work = work_path(ctx.root, ctx.dataset, "tokenizer")
    # A fresh run leaves an old state folder where it is (it reads nothing from it) until its own
    # first state replaces it: a fresh run that fails early cannot destroy a run worth resuming.
    if not ctx.resume:
        if INIT in ctx.inputs:  # fine-tuning (with freeze_encoder: the decoder alone, latents kept)
            start_from_checkpoint(model, ctx.inputs[INIT], Tokenizer1D.from_checkpoint, "tokenizer")
    summary = train_tokenizer(
        model, ctx.inputs["shards"], work, p.train,
        resume=ctx.resume,
        force=ctx.force, log_fn=ctx.tracker.log_metrics, text_fn=texts, teacher=teacher,
    )
    result = _publish(ctx, "tokenizer", work, summary, texts, {
        "train": p.train.to_dict(),
        "text_encoder": texts.cache.encoder.describe() if texts is not None else None,
        "init": str(ctx.inputs[INIT]) if INIT in ctx.inputs else None,  # resumed too: the weights descend from it
    })
    if result.samples:
        ctx.tracker.log_image(contact_sheet([image for image, _ in result.samples]), f"samples/{RECONSTRUCTIONS}")
    return result


def _publish(ctx: StageContext, output: str, work, summary: dict, texts: CaptionTexts | None, details: dict) -> StageResult:
    """Copy a training run's exported checkpoint into the stage output with its training.json; the result, with previews."""
    out = ctx.outputs[output]
    for file in sorted((work / CHECKPOINT).iterdir()):
        shutil.copy2(file, out / file.name)
    trained = Tokenizer1D.from_checkpoint(out)
    atomic_write_json(out / TRAINING, {**summary, **details, "num_params": trained.num_params()})
    pairs = reconstruction_pairs(trained, ctx, texts, max(1, ctx.params.tracking.contact_sheet // 2))
    metrics = {key: float(summary[key]) for key in ("final_loss", "images_per_s", "wall_time_s")}
    return StageResult(counts={"steps": int(summary["steps"]), "params": trained.num_params()}, metrics=metrics, samples=pairs)


def _teacher(ctx: StageContext) -> Tokenizer1D:
    """The grid teacher checkpoint of the lineage (stage teacher_tokenizer); train_tokenizer freezes it."""
    return Tokenizer1D.from_checkpoint(ctx.inputs["teacher_tokenizer"])


def _with_teacher(config: TokenizerConfig, teacher: Tokenizer1D, ctx: StageContext) -> TokenizerConfig:
    """The 1D config with the teacher's config inside; a teacher that does not fit is refused naming both folders."""
    where = f"the 1D tokenizer ({ctx.outputs['tokenizer'].name} of {ctx.dataset}) and its teacher ({ctx.inputs['teacher_tokenizer']})"
    try:
        check_teacher_fits(config, teacher.config)
    except ValueError as error:
        raise ValueError(f"{where} do not fit: {error}") from None
    if INIT in ctx.inputs:
        started = read_config(ctx.inputs[INIT], TokenizerConfig.from_dict, "tokenizer")
        if started.teacher is not None and started.teacher != teacher.config.to_dict():
            raise ValueError(f"tokenizer.init {ctx.inputs[INIT]} was trained against another teacher than "
                             f"{ctx.inputs['teacher_tokenizer']}: start from a tokenizer of this teacher")
    return dataclasses.replace(config, teacher=teacher.config.to_dict())


# --------------------------------------------------------------------------------------
# teacher_tokenizer
# --------------------------------------------------------------------------------------


def teacher_tokenizer(ctx: StageContext) -> StageResult:
    """Train the grid teacher of two-stage training: one latent per patch, trained on pixels."""
    p = ctx.params.teacher_tokenizer
    seed_everything(p.train.seed)
    model = Tokenizer1D(teacher_config(ctx.params))
    work = work_path(ctx.root, ctx.dataset, "teacher_tokenizer")
    summary = train_tokenizer(model, ctx.inputs["shards"], work, p.train, resume=ctx.resume, force=ctx.force,
                              log_fn=ctx.tracker.log_metrics)
    return _publish(ctx, "teacher_tokenizer", work, summary, None, {"train": p.train.to_dict()})


# --------------------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------------------


def tokens(ctx: StageContext) -> StageResult:
    """Encode every shard once into the token cache, keyed by the tokenizer checkpoint's hash."""
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
# The registry entries of this area (pipeline.py lists them)
# --------------------------------------------------------------------------------------

STAGES = (
    Stage(
        name="teacher_tokenizer",
        func=teacher_tokenizer,
        area="tokenizer",
        description="Train the grid teacher of two-stage training (one kl latent per 8-pixel patch); "
        "the 1D tokenizer learns its latents first (tokenizer.train.proxy_steps).",
        inputs=("shards",),
        outputs=("teacher_tokenizer",),
        models=("teacher_tokenizer",),
        params=("data", "teacher_tokenizer"),
        checks=(
            AssetCheck("finite_weights", "teacher_tokenizer", "every teacher weight is finite",
                       tokenizer_checks.teacher_finite_weights),
        ),
    ),
    Stage(
        name="tokenizer",
        func=tokenizer,
        area="tokenizer",
        description="Train the 1D tokenizer (ViT encoder -> K tokens -> quantizer -> ViT decoder) "
        "with accelerate; EMA weights as safetensors + config in models/<dataset>/tokenizer.",
        inputs=("shards", "captions", "teacher_tokenizer"),
        outputs=("tokenizer",),
        models=("tokenizer",),
        code=("text",),
        params=("data", "tokenizer"),
        init_from="tokenizer",
        checks=(
            AssetCheck("finite_weights", "tokenizer", "every tokenizer weight is finite", tokenizer_checks.finite_weights),
        ),
    ),
    Stage(
        name="tokens",
        func=tokens,
        area="tokenizer",
        description="Token cache: every shard encoded once into memory-mappable latents/codes "
        "plus caption embeddings, keyed by the tokenizer checkpoint's hash.",
        inputs=("tokenizer", "shards", "captions"),
        outputs=("tokens",),
        code=("text",),
        params=("tokenizer", "tokens"),
    ),
)
