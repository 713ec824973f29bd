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

from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

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
from tokenline.training_loop import CHECKPOINT, STATE, train_with_loss

__all__ = ["CHECKPOINT", "STATE", "cache_batches", "train_generator"]


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
    swap_term, partners = _check_objective(model, cache, config)

    def batches_from(start: int, rank: int, world_size: int) -> Iterator[dict[str, Tensor]]:
        return cache_batches(cache, config.batch_size, config.seed, start, rank, world_size)

    def loss(model, raw_model, rows: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        device = next(raw_model.parameters()).device
        text = text_batch(rows, device)
        # Caption dropout from the global RNG, which the state folder restores on resume.
        drop = (torch.rand(len(text)) < config.caption_dropout).to(device)
        return _generator_loss(model, raw_model, rows, text, drop, config, cache, partners, swap_term, device)

    return train_with_loss(model, batches_from, loss, out_dir, config, save_generator, "generator",
                           resume=resume, force=force, log_fn=log_fn)
