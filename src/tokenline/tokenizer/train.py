"""Training loop for the 1D tokenizer: AdamW, cosine schedule, EMA, resumable state folders.

out_dir/state/       everything needed to continue bit for bit (weights, EMA, optimizer,
                     scheduler, RNG states, step, data position, configs)
out_dir/checkpoint/  the EMA weights as a plain tokenizer checkpoint (save_checkpoint)
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from tokenline.artifacts import atomic_dir, atomic_write_bytes, atomic_write_json
from tokenline.tokenizer.checkpoint import save_checkpoint
from tokenline.tokenizer.model import Tokenizer1D

STATE = "state"
CHECKPOINT = "checkpoint"
# Files of a state folder; TRAIN_CONFIG is written last, so its presence marks a complete folder.
MODEL_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng.pt"
PROGRESS = "progress.json"
MODEL_CONFIG = "model_config.json"
TRAIN_CONFIG = "train_config.json"


# -----------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Hyperparameters of one tokenizer training run; saved in the state folder."""

    steps: int = 1000             # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 32          # images per step
    lr: float = 1e-4              # peak learning rate, reached at the end of warmup
    weight_decay: float = 1e-4    # AdamW decoupled weight decay
    warmup_steps: int = 100       # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1     # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0        # max global gradient norm; 0 turns clipping off
    ema_decay: float = 0.999      # EMA weight of the old shadow per step; 0: shadow == model
    checkpoint_every: int = 500   # steps between state folders (one is always written at the end)
    seed: int = 0                 # seeds torch, numpy, random and the data order
    mixed_precision: str = "no"   # "no" | "bf16" | "fp16"; CPU uses "no"
    log_every: int = 10           # steps between log_fn calls

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', not {self.mixed_precision!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), not {self.ema_decay}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields."""
        return asdict(self)


# -----------------------------------------------------------------------------
# Schedule and EMA
# -----------------------------------------------------------------------------

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

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * parameters."""
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

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


# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------

class ShardImages(torch.utils.data.IterableDataset):
    """Endless (image [C, H, W] float32 in [-1, 1], key) pairs from a shards folder's split.

    Each epoch is a permutation fixed by (seed, epoch), so the stream is a pure function of
    the position: `start` skips that many samples, which is how a resumed run picks up.
    """

    def __init__(self, shard_dir: str | Path, seed: int = 0, start: int = 0, split: str = "train"):
        from tokenline.data.stages import iter_shard_samples

        self.seed, self.start = seed, start
        keys, images = [], []
        # The split is small enough to hold as uint8; decoding PNGs once beats re-reading tars.
        for sample in iter_shard_samples(Path(shard_dir), split):
            keys.append(sample["key"])
            images.append(torch.from_numpy(np.asarray(sample["image"], dtype=np.uint8).copy()).permute(2, 0, 1))
        if not images:
            raise ValueError(f"{shard_dir}: the {split!r} split has no samples to train on")
        self.keys, self.images = keys, torch.stack(images)

    def __len__(self) -> int:
        """Samples in one epoch."""
        return len(self.keys)

    def order(self, epoch: int) -> list[int]:
        """The sample order of one epoch."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.keys), generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[Tensor, str]]:
        position = self.start
        while True:
            epoch, offset = divmod(position, len(self.keys))
            for index in self.order(epoch)[offset:]:
                yield self.images[index].float() / 127.5 - 1.0, self.keys[index]
            position = (epoch + 1) * len(self.keys)


# -----------------------------------------------------------------------------
# State folders
# -----------------------------------------------------------------------------

def _tensors(module_or_dict) -> dict[str, Tensor]:
    state = module_or_dict.state_dict() if hasattr(module_or_dict, "state_dict") else module_or_dict
    return {name: t.detach().cpu().contiguous() for name, t in state.items()}


def _rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _write_state(folder: Path, model, ema, optimizer, scheduler, config, step, samples_seen, loss) -> None:
    """Write a complete state folder, replacing the old one only once the new one is whole."""
    with atomic_dir(folder) as temp:
        atomic_write_bytes(temp / MODEL_WEIGHTS, safetensors.torch.save(_tensors(model)))
        atomic_write_bytes(temp / EMA_WEIGHTS, safetensors.torch.save(_tensors(ema.state_dict())))
        torch.save(optimizer.state_dict(), temp / OPTIMIZER)
        torch.save(scheduler.state_dict(), temp / SCHEDULER)
        torch.save(_rng_states(), temp / RNG)
        atomic_write_json(temp / PROGRESS, {"step": step, "samples_seen": samples_seen, "loss": loss})
        atomic_write_json(temp / MODEL_CONFIG, model.config.to_dict())
        atomic_write_json(temp / TRAIN_CONFIG, config.to_dict())


def _export(folder: Path, model: Tokenizer1D, ema: EMA) -> None:
    """Write the EMA weights as a tokenizer checkpoint folder, atomically."""
    exported = copy.deepcopy(model)
    ema.copy_to(exported)
    with atomic_dir(folder) as temp:
        save_checkpoint(exported, temp)


def config_differences(state_dir: str | Path, model_config: dict, train_config: dict) -> list[str]:
    """Keys ("model.width", "train.lr") whose saved value differs from the given configs; `steps` is ignored."""
    state_dir = Path(state_dir)
    saved_model = json.loads((state_dir / MODEL_CONFIG).read_text())
    saved_train = json.loads((state_dir / TRAIN_CONFIG).read_text())
    differing = []
    for prefix, saved, current, ignored in (
        ("model", saved_model, model_config, set()),
        ("train", saved_train, train_config, {"steps"}),  # extending a run is what resuming is for
    ):
        for key in sorted((saved.keys() | current.keys()) - ignored):
            if saved.get(key) != current.get(key):
                differing.append(f"{prefix}.{key}")
    return differing


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

def train_tokenizer(
    model: Tokenizer1D,
    shard_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    resume: bool = False,
    force: bool = False,
    log_fn: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train `model` on a shards folder's train split; returns steps, final_loss, images_per_s, wall_time_s."""
    from accelerate import Accelerator

    started = time.perf_counter()
    out_dir = Path(out_dir)
    state_dir = out_dir / STATE
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())

    step, samples_seen, last_loss = 0, 0, float("nan")
    if resume:
        if not (state_dir / TRAIN_CONFIG).is_file():
            raise FileNotFoundError(f"{state_dir}: no complete training state to resume from")
        differing = config_differences(state_dir, model.config.to_dict(), config.to_dict())
        if differing and not force:
            raise ValueError(
                f"{state_dir} was trained with a different config ({', '.join(differing)}); "
                "pass force=True to resume anyway"
            )
        progress = json.loads((state_dir / PROGRESS).read_text())
        step, samples_seen, last_loss = progress["step"], progress["samples_seen"], progress["loss"]
        model.load_state_dict(safetensors.torch.load_file(state_dir / MODEL_WEIGHTS))
    else:
        _seed_everything(config.seed)

    model.train()
    ema = EMA(model, config.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = cosine_with_warmup(optimizer, config.warmup_steps, config.steps, config.min_lr_ratio)
    if resume:
        ema.load_state_dict(safetensors.torch.load_file(state_dir / EMA_WEIGHTS))
        optimizer.load_state_dict(torch.load(state_dir / OPTIMIZER, weights_only=True))
        scheduler.load_state_dict(torch.load(state_dir / SCHEDULER, weights_only=True))
        # Under force, a changed lr or weight decay takes effect; unchanged, these are no-ops.
        scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["weight_decay"] = config.weight_decay
        # Our own file; the numpy and python RNG states are not plain tensors.
        _set_rng_states(torch.load(state_dir / RNG, weights_only=False))

    data = ShardImages(shard_dir, seed=config.seed, start=samples_seen)
    # The loader is not passed to accelerator.prepare: its wrapper reads batches ahead, and we
    # count the data position ourselves. Its own generator keeps the global RNG untouched.
    loader = torch.utils.data.DataLoader(
        data, batch_size=config.batch_size, num_workers=0, generator=torch.Generator().manual_seed(config.seed)
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model: Tokenizer1D = accelerator.unwrap_model(model)
    size = raw_model.config.image_size
    if data.images.shape[-1] != size or data.images.shape[-2] != size:
        raise ValueError(f"{shard_dir}: images are {list(data.images.shape[-2:])}, the model expects {size}x{size}")

    def checkpoint(at_step: int) -> None:
        _write_state(state_dir, raw_model, ema, optimizer, scheduler, config, at_step, samples_seen, last_loss)
        _export(out_dir / CHECKPOINT, raw_model, ema)

    batches = iter(loader)
    first_step, saved_step = step, step
    loop_started = interval_started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, desc="tokenizer", unit="step",
               disable=not accelerator.is_local_main_process)
    while step < config.steps:
        images, _keys = next(batches)
        images = images.to(accelerator.device)
        reconstruction, quantized = model(images)
        # Reconstruction losses in float32 whatever the autocast precision.
        reconstruction = reconstruction.float()
        l1 = F.l1_loss(reconstruction, images)
        l2 = F.mse_loss(reconstruction, images)
        loss = l1 + l2 + quantized.loss.float()
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
        ema.update(raw_model)
        step += 1
        samples_seen += len(images)
        last_loss = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")

        if log_fn is not None and step % config.log_every == 0:
            now = time.perf_counter()
            metrics = {"loss": last_loss, "l1": l1.item(), "l2": l2.item(), "quantizer": quantized.loss.item(), "lr": lr}
            metrics |= {f"quantizer/{name}": float(value.detach()) for name, value in quantized.terms.items()}
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            metrics["images_per_s"] = config.log_every * config.batch_size / max(now - interval_started, 1e-9)
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
        "images_per_s": trained * config.batch_size / elapsed if trained else 0.0,
        "wall_time_s": time.perf_counter() - started,
    }
