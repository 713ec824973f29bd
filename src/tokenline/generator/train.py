"""Training loop for the generators, on the token cache: no image is decoded or encoded here.

out_dir/state/       everything needed to continue bit for bit (weights, EMA, optimizer,
                     scheduler, RNG states, step, data position, configs)
out_dir/checkpoint/  the EMA weights as a plain generator checkpoint (save_generator)

The data stream is a pure function of its position (one permutation per epoch, fixed by the
seed), so a resumed run picks up at the sample it stopped at. Under `accelerate launch`, rank r
takes every world_size-th position of that one stream: every rank runs the same number of steps
whatever the split's length, which DDP needs.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from tokenline.artifacts import atomic_dir
from tokenline.generator.checkpoint import save_generator
from tokenline.generator.model import FlowTransformer, MaskedTransformer, TextBatch
from tokenline.generator.objectives import flow_matching_loss, masked_token_loss
from tokenline.generator.train_config import GeneratorTrainConfig
from tokenline.tokenizer.token_cache import TokenCache
from tokenline.training import (
    EMA_WEIGHTS,
    MODEL_CONFIG,
    MODEL_WEIGHTS,
    OPTIMIZER,
    PROGRESS,
    RNG,
    SCHEDULER,
    TRAIN_CONFIG,
    EMA,
    cosine_with_warmup,
    restore_run,
    rng_states,
    start_run,
    write_state_folder,
)

__all__ = ["CHECKPOINT", "STATE", "cache_batches", "train_generator"]

STATE = "state"
CHECKPOINT = "checkpoint"


def cache_batches(cache: TokenCache, batch_size: int, seed: int = 0, start: int = 0,
                  rank: int = 0, world_size: int = 1) -> Iterator[dict[str, Tensor]]:
    """Endless batches of cache rows: positions start, start+1, ... of the seeded stream, this rank's share.

    One step reads batch_size * world_size positions; rank r keeps positions r, r + world_size, ...
    """
    n = len(cache)
    if n == 0:
        raise ValueError(f"the token cache at {cache.folder} has no {cache.split} samples to train on")
    orders: dict[int, Tensor] = {}

    def row_at(position: int) -> int:
        epoch, offset = divmod(position, n)
        if epoch not in orders:
            orders.clear()  # one epoch at a time is all a step can span (batch < n) or needs
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            orders[epoch] = torch.randperm(n, generator=generator)
        return int(orders[epoch][offset])

    position = start
    while True:
        span = range(position + rank, position + batch_size * world_size, world_size)
        yield cache.rows([row_at(p) for p in span])
        position += batch_size * world_size


def text_batch(rows: dict[str, Tensor], device=None) -> TextBatch:
    """The caption part of a cache batch as a TextBatch."""
    return TextBatch(rows["text_tokens"], rows["text_mask"], rows["text_pooled"]).to(device)


def train_generator(
    model: FlowTransformer | MaskedTransformer,
    cache: TokenCache,
    out_dir: str | Path,
    config: GeneratorTrainConfig,
    resume: bool = False,
    force: bool = False,
    log_fn: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train `model` on a token cache split; returns steps, final_loss, samples_per_s, wall_time_s."""
    from accelerate import Accelerator

    started = time.perf_counter()
    out_dir = Path(out_dir)
    state_dir = out_dir / STATE
    flow = isinstance(model, FlowTransformer)
    if not flow and not cache.has_codes:
        raise ValueError(f"a masked generator trains on codes; the token cache at {cache.folder} has none "
                         f"(quantizer {cache.meta['quantizer']!r})")
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())

    begun = start_run(model, state_dir, config, resume, force, "generator")
    step, samples_seen, last_loss = begun.step, begun.samples_seen, begun.loss

    model.train()
    ema = EMA(model, config.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = cosine_with_warmup(optimizer, config.warmup_steps, config.steps, config.min_lr_ratio)
    if resume:
        restore_run(state_dir, ema, optimizer, scheduler, config.lr, config.weight_decay)

    batches = cache_batches(cache, config.batch_size, config.seed, samples_seen,
                            accelerator.process_index, accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model = accelerator.unwrap_model(model)

    def checkpoint(at_step: int) -> None:
        if accelerator.is_main_process:
            write_state_folder(
                state_dir,
                {MODEL_WEIGHTS: raw_model.state_dict(), EMA_WEIGHTS: ema.state_dict()},
                {OPTIMIZER: optimizer.state_dict(), SCHEDULER: scheduler.state_dict(), RNG: rng_states()},
                {PROGRESS: {"step": at_step, "samples_seen": samples_seen, "loss": last_loss},
                 MODEL_CONFIG: raw_model.config.to_dict(), TRAIN_CONFIG: config.to_dict()},
            )
            exported = copy.deepcopy(raw_model)
            ema.copy_to(exported)
            with atomic_dir(out_dir / CHECKPOINT) as temp:
                save_generator(exported, temp)
        accelerator.wait_for_everyone()

    first_step, saved_step = step, step
    loop_started = interval_started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, desc="generator", unit="step",
               disable=not accelerator.is_local_main_process)
    while step < config.steps:
        rows = next(batches)
        text = text_batch(rows, accelerator.device)
        # Caption dropout from the global RNG, which the state folder restores on resume.
        drop = torch.rand(len(text)) < config.caption_dropout
        drop = drop.to(accelerator.device)
        with accelerator.autocast():
            if flow:
                x0 = raw_model.normalize(rows["latents"].to(accelerator.device))
                loss = flow_matching_loss(model, x0, text, drop, config.time_mean, config.time_std)
            else:
                loss = masked_token_loss(model, rows["codes"].to(accelerator.device), text, drop, config.replace_prob)
        if not torch.isfinite(loss):
            # Before backward and before any write: the last good state folder stays as it is.
            bar.close()
            raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {step + 1}")
        accelerator.backward(loss)
        grad_norm = None
        if config.grad_clip > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(raw_model, step)
        step += 1
        samples_seen += config.batch_size * accelerator.num_processes
        last_loss = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")

        if log_fn is not None and step % config.log_every == 0 and accelerator.is_main_process:
            now = time.perf_counter()
            metrics = {"loss": last_loss, "lr": lr}
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            metrics["samples_per_s"] = config.log_every * config.batch_size * accelerator.num_processes / max(now - interval_started, 1e-9)
            interval_started = now
            log_fn(step, metrics)
        if step % config.checkpoint_every == 0:
            checkpoint(step)
            saved_step = step
    bar.close()
    elapsed = time.perf_counter() - loop_started
    if saved_step != step or not (state_dir / TRAIN_CONFIG).is_file():
        checkpoint(step)
    trained = step - first_step
    return {
        "steps": step,
        "final_loss": last_loss,
        "samples_per_s": trained * config.batch_size * accelerator.num_processes / elapsed if trained else 0.0,
        "wall_time_s": time.perf_counter() - started,
    }
