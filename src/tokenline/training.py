"""Pieces every training loop shares: EMA, the warm-up/cosine schedule, RNG capture, resume checks,
and the step bookkeeping (progress bar, log and checkpoint cadence, throughput, the summary).

The tokenizer and generator loops differ in their data and losses; what makes a run resumable
bit for bit (the RNG states, the schedule, the EMA shadow) and what refuses a changed config
lives here once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from tokenline.artifacts import atomic_dir, atomic_write_bytes, atomic_write_json
from tokenline.precision import cpu_bf16, cpu_has_bf16_units

# Files of every state folder; a loop may add its own (the tokenizer's discriminator).
MODEL_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG_TENSORS = "rng.safetensors"  # torch, numpy (and CUDA) generator states as tensors
RNG_STATE = "rng.json"  # the rest of the numpy state and python's random state
LEGACY_RNG = "rng.pt"  # a pickle written by tokenline before 0.2: never loaded
PROGRESS = "progress.json"
MODEL_CONFIG = "model_config.json"
TRAIN_CONFIG = "train_config.json"  # written last: its presence marks a complete folder

log = logging.getLogger(__name__)

__all__ = ["EMA", "ResumeRefusedError", "StepLoop", "TrainingRun", "apply_gradients", "begin_training", "config_differences", "cosine_with_warmup", "RunProgress", "restore_optimization", "restore_run", "rng_states", "saved_config_differences", "seed_everything", "set_rng_states", "start_run", "training_summary", "write_state_folder"]


class ResumeRefusedError(ValueError):
    """Resuming a state folder saved with a different config, without force."""


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float) -> LambdaLR:
    """Linear warmup to the base lr over `warmup` steps, then a cosine down to base * min_ratio at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            # (step + 1): the very first step already learns instead of running at lr 0.
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


class EMA:
    """An exponential moving average of a model's parameters (the shadow), kept in float32."""
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        # float32 even under mixed precision: tiny per-step updates vanish in bf16.
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    def decay_at(self, step: int) -> float:
        """The decay used for the update after `step` updates: warmed up, capped at `decay`."""
        # Without the warm-up a short run's EMA keeps decay**steps of the random init
        # (0.999**1000 = 37 %): min(decay, (1 + n) / (10 + n)) forgets it early.
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """shadow <- d * shadow + (1 - d) * parameters, d = decay_at(step) (plain `decay` without a step); frozen ones are skipped."""
        decay = self.decay if step is None else self.decay_at(step)
        for name, p in model.named_parameters():
            if p.requires_grad:  # a frozen parameter keeps its shadow bit for bit
                self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)

    def state_dict(self) -> dict[str, Tensor]:
        """The shadow tensors by parameter name."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace the shadow with saved tensors; names must match exactly."""
        if state.keys() != self.shadow.keys():
            missing, unexpected = sorted(self.shadow.keys() - state.keys()), sorted(state.keys() - self.shadow.keys())
            raise ValueError(f"EMA state does not match the model: missing {missing}, unexpected {unexpected}")
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow into the model's parameters (buffers are left as they are)."""
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name].to(p.dtype))


def restore_optimization(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, optimizer_file: Path,
                         scheduler_file: Path, lr: float, weight_decay: float) -> None:
    """Load optimizer and scheduler state, then apply the current config's lr, weight decay and schedule.

    Under force a changed lr or weight decay takes effect, and a run extended to more steps
    follows its new, longer schedule from the step it resumes at (the saved optimizer holds the
    old schedule's lr); for an unchanged config all of this is a no-op.
    """
    optimizer.load_state_dict(torch.load(optimizer_file, weights_only=True))
    scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["weight_decay"] = weight_decay
        group["lr"] = lr * factor(scheduler.last_epoch)


def rng_states() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The torch, numpy, python (and CUDA) RNG states as (tensors, JSON document), so no pickle is needed."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors |= {f"cuda_{index}": state for index, state in enumerate(torch.cuda.get_rng_state_all())}
    document = {
        "numpy": {"kind": kind, "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    return tensors, document


def set_rng_states(tensors: Mapping[str, Tensor], document: Mapping[str, Any]) -> None:
    """Restore what rng_states() captured."""
    torch.set_rng_state(tensors["torch"])
    state = document["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((state["kind"], keys, state["position"], state["has_gauss"], state["cached_gaussian"]))
    python = document["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    cuda = [tensors[f"cuda_{index}"] for index in range(len(tensors)) if f"cuda_{index}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def config_differences(saved: Mapping[str, Mapping], current: Mapping[str, Mapping], ignored: Mapping[str, set] | None = None) -> list[str]:
    """Keys ("model.width", "train.lr") whose saved value differs, section by section; `ignored` skips keys per section."""
    ignored = ignored or {}
    differing = []
    for section in sorted(saved.keys() | current.keys()):
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted((old.keys() | new.keys()) - set(ignored.get(section, ()))):
            if old.get(key) != new.get(key):
                differing.append(f"{section}.{key}")
    return differing


def saved_config_differences(state_dir: str | Path, model_config: dict, train_config: dict,
                             train_defaults: Mapping[str, Any] | None = None) -> list[str]:
    """Keys ("model.width", "train.lr") whose value in a state folder differs; `steps` may change.

    A train key the saved config lacks counts as its `train_defaults` value: a field added
    after the state was saved, which that run trained without, i.e. at its default.
    """
    state_dir = Path(state_dir)
    saved = {"model": json.loads((state_dir / MODEL_CONFIG).read_text()),
             "train": {**(train_defaults or {}), **json.loads((state_dir / TRAIN_CONFIG).read_text())}}
    # Extending a run is what resuming is for.
    return config_differences(saved, {"model": model_config, "train": train_config}, {"train": {"steps"}})


def write_state_folder(
    folder: str | Path,
    tensors: Mapping[str, Mapping[str, Tensor]],
    objects: Mapping[str, Any],
    documents: Mapping[str, Any],
) -> None:
    """Write a state folder whole or not at all: safetensors files, torch.save files, JSON documents, RNG states.

    `objects` hold plain state dicts (tensors, numbers, strings) that torch.load reads back with
    weights_only=True. The RNG states are captured here, at the moment of writing: what a resumed
    run continues from. The folder is built beside the old one and swapped in only once complete,
    so a crash (or a NaN stop) mid-write leaves the last good state as it was.
    """
    rng_tensors, rng_document = rng_states()
    tensors = {**tensors, RNG_TENSORS: rng_tensors}
    documents = {RNG_STATE: rng_document, **documents}  # TRAIN_CONFIG stays last: it marks a complete folder
    with atomic_dir(Path(folder)) as temp:
        for name, state in tensors.items():
            plain = {key: t.detach().cpu().contiguous() for key, t in state.items()}
            atomic_write_bytes(temp / name, safetensors.torch.save(plain))
        for name, value in objects.items():
            torch.save(value, temp / name)
        for name, document in documents.items():
            atomic_write_json(temp / name, document)


def write_training_state(folder: str | Path, model: nn.Module, ema: EMA, optimizer, scheduler, config: Any,
                         progress: RunProgress, extra_tensors: Mapping[str, Mapping[str, Tensor]] | None = None,
                         extra_objects: Mapping[str, Any] | None = None) -> None:
    """A training loop's state folder: weights, EMA, optimizer, scheduler, progress and both configs."""
    write_state_folder(
        folder,
        {MODEL_WEIGHTS: model.state_dict(), EMA_WEIGHTS: ema.state_dict(), **(extra_tensors or {})},
        {OPTIMIZER: optimizer.state_dict(), SCHEDULER: scheduler.state_dict(), **(extra_objects or {})},
        {PROGRESS: dataclasses.asdict(progress), MODEL_CONFIG: model.config.to_dict(), TRAIN_CONFIG: config.to_dict()},
    )


@dataclass
class RunProgress:
    """Where a training run stands: the steps taken, the samples seen and the last loss."""
    step: int = 0
    samples_seen: int = 0
    loss: float = float("nan")


def start_run(model: nn.Module, state_dir: Path, train_config, resume: bool, force: bool, stage: str) -> RunProgress:
    """A fresh run seeds everything from the config; a resumed one checks the saved config, then loads weights and progress.

    Refuses (ResumeRefusedError, naming the keys) a state saved with another model or train
    config unless `force`; a missing or incomplete state folder is a FileNotFoundError.
    """
    if not resume:
        seed_everything(train_config.seed)
        return RunProgress()
    if not (state_dir / TRAIN_CONFIG).is_file():
        raise FileNotFoundError(f"{state_dir}: no complete training state to resume from")
    if not (state_dir / RNG_TENSORS).is_file():
        # Its RNG states are a pickle (rng.pt), and unpickling a file runs whatever code it names.
        raise ResumeRefusedError(
            f"{state_dir} has no {RNG_TENSORS} (an older state folder keeps its RNG in {LEGACY_RNG}, a pickle "
            f"tokenline never loads); start a fresh run: `tokenline run {stage} --force` without --resume"
        )
    defaults = {f.name: f.default for f in dataclasses.fields(train_config) if f.default is not dataclasses.MISSING}
    differing = saved_config_differences(state_dir, model.config.to_dict(), {**defaults, **train_config.to_dict()}, defaults)
    if differing and not force:
        raise ResumeRefusedError(
            f"{state_dir} was trained with a different config ({', '.join(differing)}); "
            f"pass force=True (`tokenline run {stage} --resume --force`) to resume anyway"
        )
    progress = json.loads((state_dir / PROGRESS).read_text())
    model.load_state_dict(safetensors.torch.load_file(state_dir / MODEL_WEIGHTS))
    return RunProgress(progress["step"], progress["samples_seen"], progress["loss"])


def restore_run(state_dir: Path, ema: EMA, optimizer: torch.optim.Optimizer, scheduler: LambdaLR, lr: float,
                weight_decay: float) -> None:
    """Load a resumed run's EMA, optimizer, schedule and RNG states, once every RNG-drawing module is built."""
    ema.load_state_dict(safetensors.torch.load_file(state_dir / EMA_WEIGHTS))
    restore_optimization(optimizer, scheduler, state_dir / OPTIMIZER, state_dir / SCHEDULER, lr, weight_decay)
    set_rng_states(safetensors.torch.load_file(state_dir / RNG_TENSORS), json.loads((state_dir / RNG_STATE).read_text()))


def apply_gradients(accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                    grad_clip: float) -> tuple[float, Tensor | None]:
    """Clip (when grad_clip > 0), step the optimizer and the schedule, clear the gradients.

    Returns the learning rate the step used and the gradient norm before clipping (None
    without clipping), left a tensor so that no step waits on the device unless it logs.
    """
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else None
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm


class StepLoop:
    """The step bookkeeping of a training loop: progress bar, log and checkpoint cadence, throughput, summary.

    `checkpoint(progress)` writes a state folder at `progress.step`; the loop calls it every
    `config.checkpoint_every` steps and once at the end unless the last step was just saved.
    """

    def __init__(self, name: str, config, start: RunProgress, items_per_step: int,
                 checkpoint: Callable[[RunProgress], None], state_dir: Path, show_bar: bool = True):
        self.name, self.config, self.checkpoint, self.state_dir = name, config, checkpoint, Path(state_dir)
        self.progress = RunProgress(start.step, start.samples_seen, start.loss)
        self.items_per_step = items_per_step
        self.first_step = self.saved_step = start.step
        self.started = self.interval_started = time.perf_counter()
        self.bar = tqdm(total=config.steps, initial=start.step, desc=name, unit="step", disable=not show_bar)

    @property
    def step(self) -> int:
        """Steps taken, counting those of a resumed run."""
        return self.progress.step

    def running(self) -> bool:
        """Whether steps remain."""
        return self.progress.step < self.config.steps

    def refuse_non_finite(self, loss: Tensor) -> None:
        """Stop with FloatingPointError on a NaN or infinite loss, before backward and before any write."""
        if not torch.isfinite(loss):
            # The last good state folder stays as it is.
            self.bar.close()
            raise FloatingPointError(
                f"{self.name}: non-finite loss ({loss.item()}) at step {self.progress.step + 1}; the last good "
                f"state in {self.state_dir} is kept (try a lower {self.name}.train.lr)"
            )

    def advance(self, loss: float, samples: int) -> None:
        """Count one finished step of `samples` samples (all processes) that ended at `loss`."""
        self.progress.step += 1
        self.progress.samples_seen += samples
        self.progress.loss = loss
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}")

    def log_due(self) -> bool:
        """Whether this step is a log step."""
        return self.progress.step % self.config.log_every == 0

    def interval_rate(self) -> float:
        """Items per second since the previous call (or the loop's start)."""
        now = time.perf_counter()
        rate = self.config.log_every * self.items_per_step / max(now - self.interval_started, 1e-9)
        self.interval_started = now
        return rate

    def checkpoint_if_due(self) -> None:
        """Write a state folder every `checkpoint_every` steps."""
        if self.progress.step % self.config.checkpoint_every == 0:
            self.checkpoint(self.progress)
            self.saved_step = self.progress.step

    def finish(self) -> float:
        """Close the bar and write the last state folder unless just written; returns items/s over this run's steps."""
        self.bar.close()
        elapsed = time.perf_counter() - self.started
        if self.saved_step != self.progress.step or not (self.state_dir / TRAIN_CONFIG).is_file():
            self.checkpoint(self.progress)
        trained = self.progress.step - self.first_step
        return trained * self.items_per_step / elapsed if trained else 0.0


@dataclass
class TrainingRun:
    """What every training loop starts from: the accelerator, where the run stands, the EMA, optimizer and schedule."""
    accelerator: Any
    begun: RunProgress
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    started: float  # perf_counter at the start, for the summary's wall time


def begin_training(model: nn.Module, state_dir: Path, config, resume: bool, force: bool, stage: str) -> TrainingRun:
    """The loop prologue: an accelerator, a fresh (seeded) or resumed start, the model in train mode, EMA, AdamW, the schedule.

    A loop builds what else draws from the RNG (a discriminator) after this and before
    restore_run, in the same order on a fresh and a resumed run: that keeps resume bit-exact.
    """
    from accelerate import Accelerator  # heavy (seconds): imported by the loops that train
    from accelerate.state import AcceleratorState

    started = time.perf_counter()
    # accelerate keeps one AcceleratorState per process and refuses another precision; a process
    # that runs several stages (`tokenline run all`, the tests) may train one in fp32 and the next
    # in bf16, so a state of another precision is dropped (the process group, PartialState, stays).
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != config.mixed_precision:
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    begun = start_run(model, state_dir, config, resume, force, stage)
    model.train()
    ema = EMA(model, config.ema_decay)
    # Fused AdamW pays on CPU under bf16 (measured with the math attention backend: step_context);
    # fp32 keeps the for-each kernel, so its runs stay as they were bit for bit.
    fused = True if cpu_bf16(config, accelerator) else None
    if fused and not cpu_has_bf16_units():
        log.warning("%s: mixed_precision bf16 on a CPU without bf16 units (no AVX512-BF16 or AMX): bf16 matmuls are "
                    "emulated and run many times slower than fp32 here (benchmarks/RESULTS.md); set "
                    "%s.train.mixed_precision=no", stage, stage)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    scheduler = cosine_with_warmup(optimizer, config.warmup_steps, config.steps, config.min_lr_ratio)
    return TrainingRun(accelerator, begun, ema, optimizer, scheduler, started)


def training_summary(loop: StepLoop, run: TrainingRun, rate_name: str) -> dict[str, float]:
    """The loop epilogue: write the last state (StepLoop.finish), then steps, final_loss, the throughput as `rate_name`, wall_time_s."""
    rate = loop.finish()
    return {"steps": loop.step, "final_loss": loop.progress.loss, rate_name: rate,
            "wall_time_s": time.perf_counter() - run.started}
