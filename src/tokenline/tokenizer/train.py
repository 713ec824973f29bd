"""Training loop for the 1D tokenizer: AdamW, cosine schedule, EMA, resumable state folders.

out_dir/state/       everything needed to continue bit for bit (weights, EMA, optimizer,
                     scheduler, RNG states, step, data position, configs)
out_dir/checkpoint/  the EMA weights as a plain tokenizer checkpoint (save_checkpoint)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenline.artifacts import atomic_dir
from tokenline.data.shards import iter_shard_samples
from tokenline.tokenizer.adversarial import (
    PatchDiscriminator,
    adaptive_weight,
    adversarial_factor,
    hinge_discriminator_loss,
    hinge_generator_loss,
    load_perceptual_loss,
)
from tokenline.tokenizer.checkpoint import save_checkpoint
from tokenline.tokenizer.model import Tokenizer1D
from tokenline.tokenizer.two_stage import PROXY, enter_phase, phase_at, proxy_loss, teacher_targets
from tokenline.train_config import LossConfig, TrainConfig
from tokenline.precision import step_context
from tokenline.training import (
    EMA,
    ResumeRefusedError,
    RunProgress,
    StepLoop,
    apply_gradients,
    begin_training,
    cosine_with_warmup,
    restore_run,
    saved_config_differences,
    training_summary,
    write_training_state,
)

__all__ = [
    "EMA", "LossConfig", "ResumeRefusedError", "ShardImages", "TrainConfig", "cosine_with_warmup",
    "foreground_mask", "pixel_losses", "saved_config_differences", "train_tokenizer",
]

STATE = "state"
CHECKPOINT = "checkpoint"
# State files only the tokenizer has; the shared ones (weights, EMA, optimizer, ...) are tokenline.training's.
DISC_WEIGHTS = "discriminator.safetensors"
DISC_OPTIMIZER = "discriminator_optimizer.pt"


# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------

class ShardImages(torch.utils.data.IterableDataset):
    """Endless (image [C, H, W] float32 in [-1, 1], key) pairs from a shards folder's split.

    Each epoch is a permutation fixed by (seed, epoch), so the stream is a pure function of
    the position: `start` skips that many samples, which is how a resumed run picks up.
    Under several processes, rank r of `world_size` takes every world_size-th position of that
    one global stream: the processes see disjoint samples and `start` stays a global count.
    """

    def __init__(self, shard_dir: str | Path, seed: int = 0, start: int = 0, split: str = "train",
                 rank: int = 0, world_size: int = 1):

        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.seed, self.start, self.rank, self.world_size = seed, start, rank, world_size
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
                if position % self.world_size == self.rank:
                    yield self.images[index].float() / 127.5 - 1.0, self.keys[index]
                position += 1


# -----------------------------------------------------------------------------
# State folders
# -----------------------------------------------------------------------------

@dataclass
class _Adversary:
    """The discriminator and its optimizer, present when the adversarial weight is above 0."""

    discriminator: nn.Module
    optimizer: torch.optim.Optimizer


def _write_state(folder: Path, model, ema, optimizer, scheduler, adversary, config, progress: RunProgress) -> None:
    """Write a complete state folder, replacing the old one only once the new one is whole."""
    tensors, objects = {}, {}
    if adversary is not None:
        tensors[DISC_WEIGHTS] = adversary.discriminator.state_dict()
        objects[DISC_OPTIMIZER] = adversary.optimizer.state_dict()
    write_training_state(folder, model, ema, optimizer, scheduler, config, progress, tensors, objects)


def _export(folder: Path, model: Tokenizer1D, ema: EMA) -> None:
    """Write the EMA weights as a tokenizer checkpoint folder, atomically."""
    exported = copy.deepcopy(model)
    ema.copy_to(exported)
    with atomic_dir(folder) as temp:
        save_checkpoint(exported, temp)


# -----------------------------------------------------------------------------
# Losses
# -----------------------------------------------------------------------------

def foreground_mask(images: Tensor, threshold: float) -> Tensor:
    """[B, 1, H, W] float, 1 where a pixel differs from its image's background by more than `threshold`.

    The background is the per-channel median of the image's one-pixel border, so a white, black or
    coloured backdrop all work; a pixel is foreground when any channel is further from it than
    `threshold` (images in [-1, 1]).
    """
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]  # [B, C, 1, 1]
    return ((images - background).abs().amax(dim=1, keepdim=True) > threshold).float()


def pixel_losses(reconstruction: Tensor, images: Tensor, loss: LossConfig) -> dict[str, Tensor]:
    """The L1 and L2 terms: plain means, or with loss.foreground > 0 means weighted toward the foreground.

    A foreground pixel (foreground_mask) weighs 1 + w, every other pixel 1, where per image
    w = min(loss.foreground, (1 - 2 f) / f) and f is the image's foreground share: the boost stops
    where the foreground would outweigh the background, so a few small shapes on white get the
    full weight while a glyph that fills half the image is left nearly plain. The weighted mean
    divides by the weights' sum, so the loss keeps its scale (an image without foreground gives
    the plain mean) and only the balance between foreground and background pixels moves.
    """
    if loss.foreground <= 0:
        return {"l1": F.l1_loss(reconstruction, images), "l2": F.mse_loss(reconstruction, images)}
    mask = foreground_mask(images, loss.foreground_threshold)
    share = mask.mean(dim=(1, 2, 3), keepdim=True)
    extra = ((1.0 - 2.0 * share) / share.clamp_min(1e-6)).clamp(0.0, loss.foreground)
    weights = 1.0 + extra * mask
    total = weights.sum() * images.shape[1]  # the weights broadcast over the channels
    difference = reconstruction - images
    return {
        "l1": (weights * difference.abs()).sum() / total,
        "l2": (weights * difference.square()).sum() / total,
    }


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

TextFn = Callable[[list[str]], tuple[Tensor, Tensor]]


def _build_adversary(config: TrainConfig, channels: int, device) -> _Adversary | None:
    loss = config.loss
    if loss.adversarial <= 0:
        return None
    discriminator = PatchDiscriminator(channels, width=loss.disc_width, layers=loss.disc_layers).to(device)
    # betas (0.5, 0.9): the usual GAN setting; momentum 0.9 makes the min-max game oscillate.
    optimizer = torch.optim.AdamW(discriminator.parameters(), lr=loss.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
    return _Adversary(discriminator, optimizer)


def _loss_modules(config: TrainConfig, channels: int, device) -> tuple[_Adversary | None, nn.Module | None]:
    """The discriminator (when loss.adversarial > 0) and the VGG perceptual loss (when loss.perceptual > 0 and weights exist)."""
    adversary = _build_adversary(config, channels, device)
    perceptual = load_perceptual_loss(config.loss.perceptual_weights) if config.loss.perceptual > 0 else None
    return adversary, perceptual.to(device) if perceptual is not None else None


def _restore_adversary(adversary: _Adversary | None, state_dir: Path) -> None:
    """Load the discriminator and its optimizer from a state folder that has them."""
    if adversary is not None and (state_dir / DISC_WEIGHTS).is_file():
        adversary.discriminator.load_state_dict(safetensors.torch.load_file(state_dir / DISC_WEIGHTS))
        adversary.optimizer.load_state_dict(torch.load(state_dir / DISC_OPTIMIZER, weights_only=True))


def _shard_loader(shard_dir: str | Path, config: TrainConfig, start: int, accelerator) -> tuple[ShardImages, Any]:
    """The train split from sample `start` on (this process's share) and its batch loader."""
    data = ShardImages(shard_dir, seed=config.seed, start=start,
                       rank=accelerator.process_index, world_size=accelerator.num_processes)
    # The loader is not passed to accelerator.prepare: ShardImages splits the data between
    # processes itself, and its wrapper would read batches ahead of the position we count.
    # Its own generator keeps the global RNG untouched.
    loader = torch.utils.data.DataLoader(
        data, batch_size=config.batch_size, num_workers=0, generator=torch.Generator().manual_seed(config.seed)
    )
    return data, loader


def _tokenizer_loss(model, raw_model: Tokenizer1D, images: Tensor, text, weights: LossConfig, perceptual,
                    adversary: _Adversary | None, step: int,
                    latent_noise: float = 0.0) -> tuple[Tensor, Tensor, Any, dict[str, Tensor]]:
    """One pixel-phase step's loss: pixel terms (+ perceptual), the quantizer's, and after warm-up the adaptive GAN term.

    Returns (loss, reconstruction, the quantizer output, the terms by name); a `generator` term
    means the adversary is on this step.
    """
    reconstruction, quantized = model(images, text, latent_noise=latent_noise)
    # Reconstruction losses in float32 whatever the autocast precision.
    reconstruction = reconstruction.float()
    terms = pixel_losses(reconstruction, images, weights)
    reconstruction_loss = weights.l1 * terms["l1"] + weights.l2 * terms["l2"]
    if perceptual is not None:
        terms["perceptual"] = perceptual(reconstruction, images)
        reconstruction_loss = reconstruction_loss + weights.perceptual * terms["perceptual"]
    loss = reconstruction_loss + quantized.loss.float()
    if adversary is not None and adversarial_factor(step, weights.adversarial_start) > 0:
        terms["generator"] = hinge_generator_loss(adversary.discriminator(reconstruction))
        # Balances the two gradients at the decoder's last layer, as VQGAN does.
        terms["adaptive_weight"] = adaptive_weight(reconstruction_loss, terms["generator"], raw_model.last_layer.weight)
        loss = loss + weights.adversarial * terms["adaptive_weight"] * terms["generator"]
    return loss, reconstruction, quantized, terms


def _proxy_step_loss(model, images: Tensor, text, teacher: Tokenizer1D) -> tuple[Tensor, Any, dict[str, Tensor]]:
    """One proxy-phase step's loss: the teacher-latent term plus the quantizer's; (loss, quantizer output, terms)."""
    predicted, quantized = model(images, text, predict="teacher")
    terms = {"proxy": proxy_loss(predicted, teacher_targets(teacher, images), teacher)}
    return terms["proxy"] + quantized.loss.float(), quantized, terms


def _discriminator_step(accelerator, adversary: _Adversary, images: Tensor, reconstruction: Tensor) -> Tensor:
    """One hinge update of the discriminator on real images against this step's reconstructions; returns its loss."""
    # The generator's backward left gradients in the discriminator: clear them first.
    adversary.optimizer.zero_grad(set_to_none=True)
    # One forward over real and fake together: one backward per forward, as DDP requires
    # (GroupNorm is per sample, so the concatenation changes nothing else).
    logits = adversary.discriminator(torch.cat([images, reconstruction.detach()]))
    loss = hinge_discriminator_loss(*logits.chunk(2))
    accelerator.backward(loss)
    adversary.optimizer.step()
    adversary.optimizer.zero_grad(set_to_none=True)
    return loss


def _step_metrics(loop: StepLoop, raw_model: Tokenizer1D, quantized, terms: dict[str, Tensor], lr: float,
                  grad_norm) -> dict[str, float]:
    """What a log step sends to MLflow: loss, lr, every term, the quantizer's terms and usage, grad norm, images/s."""
    metrics = {"loss": loop.progress.loss, "quantizer": quantized.loss.item(), "lr": lr}
    metrics |= {name: float(value.detach()) for name, value in terms.items()}
    metrics |= {f"quantizer/{name}": float(value.detach()) for name, value in quantized.terms.items()}
    metrics |= {f"quantizer/{name}": float(value) for name, value in raw_model.quantizer.usage_stats().items()}
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    metrics["images_per_s"] = loop.interval_rate()
    return metrics


def train_tokenizer(
    model: Tokenizer1D,
    shard_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    resume: bool = False,
    force: bool = False,
    log_fn: Callable[[int, dict[str, float]], None] | None = None,
    text_fn: TextFn | None = None,
    teacher: Tokenizer1D | None = None,
) -> dict[str, float]:
    """Train `model` on a shards folder's train split; returns steps, final_loss, images_per_s, wall_time_s.

    `text_fn(keys)` gives the caption input (states [B, T, D], mask [B, T]) of a batch's sample
    keys; a text-conditioned model needs it. A two-stage model (config.teacher) needs its grid
    `teacher` for the first `config.proxy_steps` steps (tokenline.tokenizer.two_stage). Under
    `accelerate launch` each process reads its own part of the data and only the main process
    writes state folders and checkpoints.
    """
    out_dir = Path(out_dir)
    state_dir = out_dir / STATE
    _check_inputs(model, config, text_fn, teacher)
    run = begin_training(model, state_dir, config, resume, force, "tokenizer")
    accelerator, begun, ema, optimizer, scheduler = run.accelerator, run.begun, run.ema, run.optimizer, run.scheduler
    adversary, perceptual, phase = _set_up(model, run, config, state_dir, resume, teacher)

    data, loader = _shard_loader(shard_dir, config, begun.samples_seen, accelerator)
    size = model.config.image_size
    if data.images.shape[-1] != size or data.images.shape[-2] != size:
        raise ValueError(f"{shard_dir}: images are {list(data.images.shape[-2:])}, the model expects {size}x{size}")
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if adversary is not None:
        adversary.discriminator, adversary.optimizer = accelerator.prepare(adversary.discriminator, adversary.optimizer)
    raw_model: Tokenizer1D = accelerator.unwrap_model(model)

    def checkpoint(progress: RunProgress) -> None:
        if accelerator.is_main_process:
            plain = None if adversary is None else _Adversary(accelerator.unwrap_model(adversary.discriminator), adversary.optimizer)
            _write_state(state_dir, raw_model, ema, optimizer, scheduler, plain, config, progress)
            _export(out_dir / CHECKPOINT, raw_model, ema)
        accelerator.wait_for_everyone()

    batches = iter(loader)
    loop = StepLoop("tokenizer", config, begun, config.batch_size * accelerator.num_processes, checkpoint, state_dir,
                    show_bar=accelerator.is_local_main_process)
    with step_context(config, accelerator):  # on CPU with bf16: the fast attention backend
        while loop.running():
            if phase != (phase := phase_at(loop.step, config.proxy_steps, teacher is not None)):
                enter_phase(raw_model, ema, phase, config.freeze_encoder)
            images, text = _next_batch(batches, text_fn, accelerator.device)
            if phase == PROXY:
                loss, quantized, terms = _proxy_step_loss(model, images, text, teacher)
            else:
                loss, reconstruction, quantized, terms = _tokenizer_loss(model, raw_model, images, text, config.loss,
                                                                         perceptual, adversary, loop.step,
                                                                         config.latent_noise)
            loop.refuse_non_finite(loss)
            accelerator.backward(loss)
            lr, grad_norm = apply_gradients(accelerator, model, optimizer, scheduler, config.grad_clip)
            if "generator" in terms:
                terms["discriminator"] = _discriminator_step(accelerator, adversary, images, reconstruction)
            ema.update(raw_model, loop.step)
            loop.advance(loss.item(), len(images) * accelerator.num_processes)

            if log_fn is not None and loop.log_due() and accelerator.is_main_process:
                log_fn(loop.step, _step_metrics(loop, raw_model, quantized, terms, lr, grad_norm))
            loop.checkpoint_if_due()
    return training_summary(loop, run, "images_per_s")


def _set_up(model: Tokenizer1D, run, config: TrainConfig, state_dir: Path, resume: bool, teacher: Tokenizer1D | None):
    """The loss modules, a resumed run's state restored, and the phase of the first step entered:
    (adversary, perceptual loss, phase)."""
    adversary, perceptual = _loss_modules(config, model.config.channels, run.accelerator.device)
    if resume:  # after every module that draws from the RNG is built: see begin_training
        restore_run(state_dir, run.ema, run.optimizer, run.scheduler, config.lr, config.weight_decay)
        _restore_adversary(adversary, state_dir)
    # Set before accelerator.prepare, so a wrapper sees which parameters train. A two-stage run that
    # crosses from proxy to pixels under several processes changes that set mid-run (docs/tokenizers.md).
    phase = phase_at(run.begun.step, config.proxy_steps, teacher is not None)
    enter_phase(model, run.ema, phase, config.freeze_encoder)
    if teacher is not None:  # a fixed target: eval mode (kl means, no codebook updates), no gradients
        teacher.to(run.accelerator.device).eval().requires_grad_(False)
    return adversary, perceptual, phase


def _next_batch(batches: Iterator, text_fn: TextFn | None, device) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """The next batch's images and, for a text-conditioned model, its caption input, on `device`."""
    images, keys = next(batches)
    text = None if text_fn is None else tuple(t.to(device) for t in text_fn(list(keys)))
    return images.to(device), text


def _check_inputs(model: Tokenizer1D, config: TrainConfig, text_fn: TextFn | None, teacher: Tokenizer1D | None) -> None:
    """ValueError for a missing caption function, or a teacher missing, unwanted or unlike the model's."""
    if model.config.text_dim and text_fn is None:
        raise ValueError("the model is text-conditioned (text_dim > 0): pass text_fn to give each batch its captions")
    if model.config.teacher is None and teacher is not None:
        raise ValueError("a teacher was given but the model has none in its config (TokenizerConfig.teacher)")
    if model.config.teacher is not None and config.proxy_steps > 0:
        if teacher is None:
            raise ValueError(f"the model is two-stage: pass its grid teacher for the {config.proxy_steps} proxy steps")
        if teacher.config.to_dict() != model.config.teacher:
            raise ValueError("the teacher given is not the one the model's config names (TokenizerConfig.teacher)")
