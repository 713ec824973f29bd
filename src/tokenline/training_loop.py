"""The one training loop of the generators and students: batches in, a loss out, everything else shared.

out_dir/state/       everything needed to continue bit for bit (weights, EMA, optimizer, scheduler,
                     RNG states, step, data position, configs)
out_dir/checkpoint/  the EMA weights, written by the caller's `save_checkpoint`

A caller gives the batch stream (from any data position and for its rank, so a resumed run picks
up where it stopped and DDP ranks split one stream) and the loss of a batch at a step; the loop
does the rest the same way for every model: accelerate, bf16 on CPU, NaN stop, gradient clipping,
EMA, MLflow metrics and state folders.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import Tensor, nn

from tokenline.artifacts import atomic_dir
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

STATE = "state"
CHECKPOINT = "checkpoint"

# (first data position, rank, world size) -> batches of rows
BatchesFrom = Callable[[int, int, int], Iterator[dict[str, Tensor]]]
# (model as trained, possibly DDP-wrapped; the unwrapped model; batch rows; step about to be taken) -> (loss, extra terms to log)
LossFn = Callable[[nn.Module, nn.Module, dict[str, Tensor], int], tuple[Tensor, dict[str, Tensor]]]


class Companion(Protocol):
    """A second model a loss trains on its own (DMD2's critic): its state joins the loop's state folder."""

    def state_tensors(self) -> dict[str, dict[str, Tensor]]:
        """File name -> state dict, saved as safetensors."""

    def state_objects(self) -> dict[str, Any]:
        """File name -> plain state dict (an optimizer's), saved with torch.save and read back weights_only."""

    def load(self, state_dir: Path) -> None:
        """Restore from a state folder written with the two above."""


class Watch(Protocol):
    """A reading taken along training from the EMA weights (e.g. a student's FID); the loop logs what it returns."""

    every: int  # steps between readings; one more at the last step

    def __call__(self, step: int, model: nn.Module) -> dict[str, float]: ...


def train_with_loss(
    model: nn.Module,
    batches_from: BatchesFrom,
    loss_fn: LossFn,
    out_dir: str | Path,
    config,
    save_checkpoint: Callable[[nn.Module, Path], object],
    stage: str,
    resume: bool = False,
    force: bool = False,
    log_fn: Callable[[int, dict[str, float]], None] | None = None,
    companion: Companion | None = None,
    watch: Watch | None = None,
) -> dict[str, float]:
    """Train `model` on `batches_from` with `loss_fn`; returns steps, final_loss, samples_per_s, wall_time_s.

    A `companion` (built before this call, as its loss needs it) is saved with every state folder
    and restored on resume, after the RNG states, like the tokenizer's discriminator. A `watch` reads
    a copy of the EMA weights every `watch.every` steps and at the end, under its own RNG state (a
    resumed run stays bit-exact); its seconds are `watch_s`, part of wall_time_s.
    """
    out_dir = Path(out_dir)
    state_dir = out_dir / STATE
    run = begin_training(model, state_dir, config, resume, force, stage)
    accelerator, ema, optimizer, scheduler = run.accelerator, run.ema, run.optimizer, run.scheduler
    if resume:
        restore_run(state_dir, ema, optimizer, scheduler, config.lr, config.weight_decay)
        if companion is not None:
            companion.load(state_dir)
    batches = batches_from(run.begun.samples_seen, accelerator.process_index, accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model = accelerator.unwrap_model(model)

    def checkpoint(progress: RunProgress) -> None:
        if accelerator.is_main_process:
            extra = {} if companion is None else {"extra_tensors": companion.state_tensors(),
                                                  "extra_objects": companion.state_objects()}
            write_training_state(state_dir, raw_model, ema, optimizer, scheduler, config, progress, **extra)
            exported = ema_copy(raw_model, ema)
            with atomic_dir(out_dir / CHECKPOINT) as temp:
                save_checkpoint(exported, temp)
        accelerator.wait_for_everyone()

    samples_per_step = config.batch_size * accelerator.num_processes
    watch_s = 0.0
    loop = StepLoop(stage, config, run.begun, samples_per_step, checkpoint, state_dir,
                    show_bar=accelerator.is_local_main_process)
    with step_context(config, accelerator):  # on CPU with bf16: the fast attention backend
        while loop.running():
            rows = next(batches)
            with accelerator.autocast():
                loss, extra = loss_fn(model, raw_model, rows, loop.step)
            loop.refuse_non_finite(loss)
            accelerator.backward(loss)
            lr, grad_norm = apply_gradients(accelerator, model, optimizer, scheduler, config.grad_clip)
            ema.update(raw_model, loop.step)
            loop.advance(loss.item(), samples_per_step)

            if log_fn is not None and loop.log_due() and accelerator.is_main_process:
                metrics = {"loss": loop.progress.loss, "lr": lr} | {name: float(value) for name, value in extra.items()}
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                metrics["samples_per_s"] = loop.interval_rate()
                log_fn(loop.step, metrics)
            loop.checkpoint_if_due()
            if watch is not None and watch.every and accelerator.is_main_process and \
                    (loop.step % watch.every == 0 or not loop.running()):
                started = time.perf_counter()
                reading = take_reading(watch, loop.step, raw_model, ema)
                watch_s += time.perf_counter() - started
                if log_fn is not None:
                    log_fn(loop.step, reading)
    return training_summary(loop, run, "samples_per_s") | ({"watch_s": watch_s} if watch is not None else {})


def ema_copy(raw_model: nn.Module, ema) -> nn.Module:
    """A copy of the model holding the EMA weights (what a checkpoint exports); training's model is untouched."""
    copied = copy.deepcopy(raw_model)
    ema.copy_to(copied)
    return copied


def take_reading(watch: Watch, step: int, raw_model: nn.Module, ema) -> dict[str, float]:
    """`watch` on a copy of the EMA weights, without touching the training RNG streams."""
    model = ema_copy(raw_model, ema).eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        return watch(step, model)
