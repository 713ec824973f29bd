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
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from tokenline.artifacts import atomic_dir
from tokenline.generator.checkpoint import save_generator
from tokenline.generator.model import FlowTransformer, MaskedTransformer, TextBatch
from tokenline.generator.objectives import (
    SwapTerm,
    flow_matching_loss,
    flow_matching_swap_loss,
    masked_token_loss,
)
from tokenline.generator.swap_pairs import require_partners, swap_partners
from tokenline.tokenizer.token_cache import TokenCache
from tokenline.train_config import GeneratorTrainConfig
from tokenline.precision import step_context
from tokenline.training import (
    RunProgress,
    StepLoop,
    apply_gradients,
    begin_training,
    restore_run,
    training_summary,
    write_training_state,
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


def _generator_loss(model, raw_model, rows: dict[str, Tensor], text: TextBatch, drop: Tensor, config: GeneratorTrainConfig,
                    cache: TokenCache, partners: Tensor | None, swap_term: SwapTerm | None, device) -> tuple[Tensor, dict[str, Tensor]]:
    """One step's loss (flow matching, with the swap term when on, or masked tokens) and the extra terms to log.

    With the swap term, the extras are `flow_loss` and `swap_gap` (the step's mean gap: swapped-caption
    loss minus true-caption loss, when any row has a swap).
    """
    if swap_term is not None:
        x0 = raw_model.normalize(rows["latents"].to(device))
        partner = partners[rows["index"]]
        has_swap = partner >= 0
        # Rows without a swap read their own caption here; the loss ignores them.
        swapped = text_batch(cache.rows(torch.where(has_swap, partner, rows["index"])), device)
        loss, flow_loss, swap_gap = flow_matching_swap_loss(
            model, x0, text, drop, swapped, has_swap.to(device), swap_term, config.time_mean, config.time_std)
        return loss, {"flow_loss": flow_loss} | ({"swap_gap": swap_gap} if swap_gap is not None else {})
    if isinstance(raw_model, FlowTransformer):
        x0 = raw_model.normalize(rows["latents"].to(device))
        return flow_matching_loss(model, x0, text, drop, config.time_mean, config.time_std), {}
    return masked_token_loss(model, rows["codes"].to(device), text, drop, config.replace_prob), {}


def _check_objective(model, cache: TokenCache, config: GeneratorTrainConfig) -> tuple[SwapTerm | None, Tensor | None]:
    """Refuse a model the cache cannot train; the swap term and each row's swap partner when the term is on."""
    flow = isinstance(model, FlowTransformer)
    if not flow and not cache.has_codes:
        raise ValueError(f"a masked generator trains on codes; the token cache at {cache.folder} has none "
                         f"(quantizer {cache.meta['quantizer']!r})")
    if config.swap_weight <= 0:
        return None, None
    if not flow:
        raise ValueError("generator.train.swap_weight > 0 contrasts flow losses; a masked generator has none "
                         "(set swap_weight 0)")
    partners = swap_partners(cache.captions)
    require_partners(partners, f"{cache.folder} ({cache.split})")
    return SwapTerm(config.swap_weight, config.swap_temperature, config.swap_min_t), partners


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
    out_dir = Path(out_dir)
    state_dir = out_dir / STATE
    swap_term, partners = _check_objective(model, cache, config)
    run = begin_training(model, state_dir, config, resume, force, "generator")
    accelerator, begun, ema, optimizer, scheduler = run.accelerator, run.begun, run.ema, run.optimizer, run.scheduler
    if resume:
        restore_run(state_dir, ema, optimizer, scheduler, config.lr, config.weight_decay)

    batches = cache_batches(cache, config.batch_size, config.seed, begun.samples_seen,
                            accelerator.process_index, accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model = accelerator.unwrap_model(model)

    def checkpoint(progress: RunProgress) -> None:
        if accelerator.is_main_process:
            write_training_state(state_dir, raw_model, ema, optimizer, scheduler, config, progress)
            exported = copy.deepcopy(raw_model)
            ema.copy_to(exported)
            with atomic_dir(out_dir / CHECKPOINT) as temp:
                save_generator(exported, temp)
        accelerator.wait_for_everyone()

    samples_per_step = config.batch_size * accelerator.num_processes
    loop = StepLoop("generator", config, begun, samples_per_step, checkpoint, state_dir,
                    show_bar=accelerator.is_local_main_process)
    with step_context(config, accelerator):  # on CPU with bf16: the fast attention backend
        while loop.running():
            rows = next(batches)
            text = text_batch(rows, accelerator.device)
            # Caption dropout from the global RNG, which the state folder restores on resume.
            drop = torch.rand(len(text)) < config.caption_dropout
            drop = drop.to(accelerator.device)
            with accelerator.autocast():
                loss, extra = _generator_loss(model, raw_model, rows, text, drop, config, cache, partners, swap_term,
                                              accelerator.device)
            loop.refuse_non_finite(loss)
            accelerator.backward(loss)
            lr, grad_norm = apply_gradients(accelerator, model, optimizer, scheduler, config.grad_clip)
            ema.update(raw_model, loop.step)
            loop.advance(loss.item(), samples_per_step)

            if log_fn is not None and loop.log_due() and accelerator.is_main_process:
                metrics = {"loss": loop.progress.loss, "lr": lr} | {name: value.item() for name, value in extra.items()}
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                metrics["samples_per_s"] = loop.interval_rate()
                log_fn(loop.step, metrics)
            loop.checkpoint_if_due()
    return training_summary(loop, run, "samples_per_s")
