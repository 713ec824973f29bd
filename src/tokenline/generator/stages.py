"""The generator stage of the lineage: train a text-to-token generator on the token cache."""

from __future__ import annotations

import shutil

import torch

from tokenline.artifacts import atomic_write_json, read_manifest
from tokenline.generator import checks as generator_checks
from tokenline.generator.checkpoint import check_pairing, load_generator
from tokenline.generator.generate import SamplingOptions, generate_images
from tokenline.generator.model import GeneratorConfig, build_generator, num_params
from tokenline.generator.spec import generator_config_values
from tokenline.generator.train import CHECKPOINT, train_generator
from tokenline.layout import work_path
from tokenline.model_checkpoint import read_config, start_from_checkpoint
from tokenline.stage import INIT, AssetCheck, Stage, StageContext, StageResult
from tokenline.text.captions import cached_text_encoder
from tokenline.tokenizer.model import Tokenizer1D
from tokenline.tokenizer.pixels import tensor_to_image
from tokenline.tokenizer.token_cache import TokenCache
from tokenline.training import seed_everything

TRAINING = "training.json"


def preview_prompts(ctx: StageContext, cache: TokenCache) -> list[str]:
    """Prompts for the sample grid: val captions (else train), then generator.preview_prompts."""
    count = max(1, ctx.params.tracking.contact_sheet // 2)
    try:
        captions = TokenCache(ctx.inputs["tokens"], "val").captions or cache.captions
    except ValueError:
        captions = cache.captions
    return list(dict.fromkeys(captions))[:count] + list(ctx.params.generator.preview_prompts)


def generator(ctx: StageContext) -> StageResult:
    """Train the generator params describe on the token cache; write its EMA checkpoint and sample previews."""
    p = ctx.params.generator
    tokenizer_dir = ctx.inputs["tokenizer"]
    tokenizer_hash = read_manifest(tokenizer_dir)["content_hash"]
    cache = TokenCache(ctx.inputs["tokens"], "train", expect_tokenizer_hash=tokenizer_hash)
    values = generator_config_values(ctx.params, cache.meta)
    start = ctx.inputs.get(INIT)
    if values["objective"] == "flow" and not values["binary"]:
        if start is not None:  # its weights (and a resumed fine-tune's) learned latents standardized by these
            started_config = read_config(start, GeneratorConfig.from_dict, "generator")
            values["latent_mean"], values["latent_std"] = started_config.latent_mean, started_config.latent_std
        else:
            values["latent_mean"], values["latent_std"] = cache.latent_statistics()
    seed_everything(p.train.seed)  # the initial weights are drawn here: two fresh runs start alike
    model = build_generator(GeneratorConfig.from_dict(values))
    work = work_path(ctx.root, ctx.dataset, "generator")
    # A fresh run reads nothing from an old state folder and replaces it with its first state, so a
    # fresh run that fails early leaves a run worth resuming intact.
    if start is not None and not ctx.resume:  # fine-tuning; the start may have learned another tokenizer's tokens
        start_from_checkpoint(model, start, load_generator, "generator", ignore=("tokenizer_hash",))
    summary = train_generator(model, cache, work, p.train, resume=ctx.resume, force=ctx.force,
                              log_fn=ctx.tracker.log_metrics)
    out = ctx.outputs["generator"]
    for file in sorted((work / CHECKPOINT).iterdir()):
        shutil.copy2(file, out / file.name)
    check_pairing(out, tokenizer_dir, tokenizer_hash)
    trained = load_generator(out)
    atomic_write_json(out / TRAINING, {
        **summary,
        "train": p.train.to_dict(),
        "objective": trained.config.objective,
        "num_params": num_params(trained),
        "tokenizer": str(tokenizer_dir.relative_to(ctx.root)),
        "tokenizer_hash": tokenizer_hash,
        "token_cache_samples": len(cache),
        "init": str(start) if start is not None else None,
    })

    prompts = preview_prompts(ctx, cache)
    encoder = cached_text_encoder(ctx.root, ctx.params)
    options = SamplingOptions(**p.sample.model_dump())
    with torch.no_grad():
        images, _ = generate_images(trained, Tokenizer1D.from_checkpoint(tokenizer_dir), prompts, encoder, options)
    samples = [(tensor_to_image(image), prompt) for image, prompt in zip(images, prompts)]
    metrics = {key: float(summary[key]) for key in ("final_loss", "samples_per_s", "wall_time_s")}
    return StageResult(counts={"steps": int(summary["steps"]), "params": num_params(trained)},
                       metrics=metrics, samples=samples)


# --------------------------------------------------------------------------------------
# The registry entries of this area (pipeline.py lists them)
# --------------------------------------------------------------------------------------

STAGES = (
    Stage(
        name="generator",
        func=generator,
        area="generator",
        description="Train the text-to-token generator on the token cache: a flow transformer over "
        "latents (kl, softvq, binary) or a masked transformer over vq codes; EMA weights in "
        "models/<dataset>/generator, sample grid from val captions.",
        inputs=("tokens", "tokenizer"),
        outputs=("generator",),
        models=("generator",),
        code=("tokenizer", "text"),
        params=("generator",),
        init_from="generator",
        checks=(
            AssetCheck("finite_weights", "generator", "every generator weight is finite", generator_checks.finite_weights),
        ),
    ),
)
