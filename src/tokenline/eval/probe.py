"""A small text-alignment probe for generated images, trained offline because no pretrained CLIP is reachable.

Why a probe
    CLIPScore needs pretrained CLIP weights, and this project never downloads weights. What it does have is a
    frozen text encoder (all-MiniLM-L6-v2, 384-d pooled sentence vectors) and real captioned training images.
    So it trains its own, small, image-text alignment model and uses it as a relative yardstick: generated
    images are scored against their prompts by a probe that has only ever seen real images.

Method: LiT with the text side locked
    LiT ("Locked-image Tuning", Zhai et al. 2022) trains one tower contrastively against a frozen other tower.
    Here the roles are swapped: the TEXT tower is the frozen, pretrained one (MiniLM's pooled embeddings,
    computed once, outside this module) and the IMAGE tower, a small ViT built from open_clip's
    ``VisionTransformer``, is trained from scratch on the real training images. A learned, bias-free linear
    projection maps the 384-d text vector into the joint space (the only trainable text-side weights), and a
    learnable temperature (CLIP's init log(1/0.07), its exponential clamped at 100) scales the similarities.
    The loss is CLIP's symmetric cross-entropy over the batch: each image must pick its caption among the
    batch's captions and each caption its image. Training augments with a random resized crop (area 0.8-1,
    aspect 3/4-4/3) and never flips, since a mirrored image would contradict "to the left of" captions.

Scores (:func:`probe_scores`)
    ``probe_score``: the mean cosine similarity, in the joint space, between each image and its own caption
        (CLIPScore-like, without CLIPScore's 2.5 * max(0, .) rescaling). Only comparable between runs that
        use the same probe weights.
    ``probe_r1``: caption retrieval recall@1. The images are split into groups of ``group`` by a random
        permutation fixed by ``seed``; within each group every image ranks the group's captions by
        similarity, and counts as a hit when its own caption comes first. A caption that occurs more than
        once in a group (the same prompt sampled twice) is matched by its embedding, not its index, so any
        copy ranking first is a hit; a tie with a different caption is a miss. A last partial group is
        MERGED into the previous full group, so every image counts and that one group is somewhat harder
        (up to 2 * group - 1 captions); with fewer than ``group`` images there is one group of them all.
        Chance is 1 / group.

Checkpoints are model_checkpoint folders: ``model.safetensors`` beside ``config.json`` (the ProbeConfig).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from tqdm import tqdm

from tokenline.model_checkpoint import config_from_dict, load_model, save_model
from tokenline.train_config import ProbeTrainConfig
from tokenline.training import cosine_with_warmup

__all__ = [
    "AlignmentProbe",
    "ProbeConfig",
    "ProbeTrainConfig",
    "clip_loss",
    "load_probe",
    "probe_scores",
    "random_resized_crop",
    "retrieval_groups",
    "save_probe",
    "train_probe",
]

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature
LOGIT_SCALE_MAX = 100.0  # CLIP's clamp: a larger scale makes the loss spiky without ranking any better
MLP_RATIO = 4.0
CROP_AREA = (0.8, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
MIN_LR_RATIO = 0.1
GRAD_CLIP = 1.0
ADAM_BETAS = (0.9, 0.98)  # CLIP's: a lower beta2 keeps Adam stable under the contrastive loss
ADAM_EPS = 1e-6
SAME_CAPTION_COSINE = 1 - 1e-5  # pooled vectors this close are one caption encoded twice (float noise only)
SCORE_BATCH = 256


@dataclass
class ProbeConfig:
    """Architecture of the alignment probe: a ViT image tower and a linear text projection."""

    image_size: int = 64
    width: int = 128
    layers: int = 4
    heads: int = 4
    patch_size: int = 8
    embed_dim: int = 128
    text_dim: int = 384

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"probe config {f.name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"probe image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"probe width {self.width} is not a multiple of heads {self.heads}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ProbeConfig:
        """The config from to_dict's output; unknown fields are an error."""
        return config_from_dict(cls, values, "probe")


class AlignmentProbe(nn.Module):
    """Trainable ViT image tower + linear projection of frozen caption embeddings into one joint space."""

    def __init__(self, config: ProbeConfig):
        super().__init__()
        # Imported here: open_clip pulls in timm and more (seconds), only worth it once a probe is built.
        from open_clip.transformer import VisionTransformer

        self.config = config
        self.visual = VisionTransformer(
            image_size=config.image_size,
            patch_size=config.patch_size,
            width=config.width,
            layers=config.layers,
            heads=config.heads,
            mlp_ratio=MLP_RATIO,
            output_dim=config.embed_dim,
        )
        # Bias-free like CLIP's projections: a bias would add the same vector to every caption.
        self.text_projection = nn.Linear(config.text_dim, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    @property
    def device(self) -> torch.device:
        """Where the probe's weights live."""
        return self.logit_scale.device

    def encode_images(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] (uint8 also accepted; resized if H, W differ) -> unit vectors [B, embed_dim]."""
        pixels = to_probe_pixels(images.to(self.device), self.config.image_size)
        return F.normalize(self.visual(pixels), dim=-1)

    def encode_texts(self, pooled: Tensor) -> Tensor:
        """Frozen pooled caption embeddings [B, text_dim] -> unit vectors [B, embed_dim]."""
        return F.normalize(self.text_projection(pooled.to(self.device, torch.float32)), dim=-1)

    def scale(self) -> Tensor:
        """The similarity scale exp(logit_scale), clamped at 100 as in CLIP."""
        return self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)

    def forward(self, images: Tensor, pooled: Tensor) -> Tensor:
        """CLIP loss of a batch of matching (image, caption embedding) pairs."""
        return clip_loss(self.encode_images(images), self.encode_texts(pooled), self.scale())

    def num_params(self) -> int:
        """Number of parameters (all trainable)."""
        return sum(p.numel() for p in self.parameters())


def clip_loss(image_emb: Tensor, text_emb: Tensor, scale: Tensor | float) -> Tensor:
    """Symmetric cross-entropy: row i of the batch's similarity matrix must pick column i, and vice versa."""
    logits = scale * image_emb @ text_emb.T
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# -----------------------------------------------------------------------------
# Pixels
# -----------------------------------------------------------------------------

def to_probe_pixels(images: Tensor, size: int) -> Tensor:
    """Float [B, 3, size, size] in [-1, 1] from uint8 or [-1, 1] float images of any size."""
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1
    else:
        images = images.float()
    if images.shape[-2:] != (size, size):
        # Antialiased, so downscaled generator samples are not aliased into patterns the probe never saw.
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images


def random_resized_crop(images: Tensor, generator: torch.Generator) -> Tensor:
    """Per image, a random crop of 80-100 % of the area (aspect 3/4-4/3) resized back to the full size."""
    count = images.shape[0]

    def uniform(low: float, high: float) -> Tensor:
        return torch.empty(count).uniform_(low, high, generator=generator)

    area = uniform(*CROP_AREA)
    aspect = uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])).exp()
    # Crop sides as fractions of the image sides; clamped so a wide crop of a large area still fits.
    width = (area * aspect).sqrt().clamp(max=1.0)
    height = (area / aspect).sqrt().clamp(max=1.0)
    # affine_grid spans [-1, 1]: a crop of side s may move its centre by up to 1 - s and stay inside.
    shift_x = (1 - width) * uniform(-1.0, 1.0)
    shift_y = (1 - height) * uniform(-1.0, 1.0)
    zeros = torch.zeros(count)
    theta = rearrange(torch.stack([width, zeros, shift_x, zeros, height, shift_y], dim=1), "b (r c) -> b r c", r=2)
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

def _probe_step(probe: AlignmentProbe, optimizer, scheduler, pixels: Tensor, pooled: Tensor, step: int) -> float:
    """One clipped AdamW step on a batch's contrastive loss; the loss, or FloatingPointError if not finite."""
    loss = probe(pixels, pooled)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite probe loss ({loss.item()}) at step {step}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(probe.parameters(), GRAD_CLIP)
    optimizer.step()
    scheduler.step()
    return loss.item()


def train_probe(
    images: Tensor,
    pooled: Tensor,
    config: ProbeConfig,
    train: ProbeTrainConfig,
    log_fn: Callable[[int, dict[str, float]], None] | None = None,
    device: torch.device | str | None = None,
) -> tuple[AlignmentProbe, dict]:
    """Train a probe on N (image, pooled caption embedding) pairs; returns it in eval mode and a summary.

    `images` are uint8 [N, 3, H, W] or float in [-1, 1]; `pooled` is [N, text_dim]. Runs on `device`
    (default: where `images` are). The summary holds steps, final_loss, wall_time_s and steps_per_s.
    """
    started = time.perf_counter()
    check_pairs(images, pooled, config.text_dim)
    device = torch.device(device) if device is not None else images.device
    # A private RNG stream: the probe's init and batches depend on train.seed only, and the caller's
    # global RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        probe = AlignmentProbe(config).to(device)
    generator = torch.Generator().manual_seed(train.seed)
    optimizer = torch.optim.AdamW(
        parameter_groups(probe, train.weight_decay), lr=train.lr, betas=ADAM_BETAS, eps=ADAM_EPS
    )
    scheduler = cosine_with_warmup(optimizer, train.warmup_steps, train.steps, MIN_LR_RATIO)
    batches = batch_indices(images.shape[0], min(train.batch_size, images.shape[0]), generator)

    probe.train()
    loss_value = math.nan
    logged_step = 0
    loop_started = interval_started = time.perf_counter()
    bar = tqdm(total=train.steps, desc="probe", unit="step")
    for step in range(1, train.steps + 1):
        rows = next(batches)
        pixels = to_probe_pixels(images[rows.to(images.device)].to(device), config.image_size)
        if train.augment:
            pixels = random_resized_crop(pixels, generator)
        lr = optimizer.param_groups[0]["lr"]
        try:
            loss_value = _probe_step(probe, optimizer, scheduler, pixels, pooled[rows.to(pooled.device)], step)
        except FloatingPointError:
            bar.close()
            raise
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if log_fn is not None and (step % train.log_every == 0 or step == train.steps):
            now = time.perf_counter()
            log_fn(step, {"loss": loss_value, "lr": lr, "logit_scale": probe.scale().item(),
                          "steps_per_s": (step - logged_step) / max(now - interval_started, 1e-9)})
            logged_step, interval_started = step, now
    bar.close()
    loop_time = time.perf_counter() - loop_started
    summary = {
        "steps": train.steps,
        "final_loss": loss_value,
        "wall_time_s": time.perf_counter() - started,
        "steps_per_s": train.steps / max(loop_time, 1e-9),
    }
    return probe.eval(), summary


def parameter_groups(probe: AlignmentProbe, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only, as in CLIP (not on gains, biases, embeddings, temperature)."""
    decayed, plain = [], []
    for name, param in probe.named_parameters():
        exempt = param.ndim < 2 or name.endswith(("positional_embedding", "class_embedding"))
        (plain if exempt else decayed).append(param)
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def batch_indices(count: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless batches of distinct rows: a fresh permutation per epoch, its incomplete tail dropped."""
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def check_pairs(images: Tensor, pooled: Tensor, text_dim: int) -> None:
    """Raise ValueError naming what is wrong with a set of (image, caption embedding) pairs."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [-1, 1], got dtype {images.dtype}")
    if pooled.ndim != 2 or pooled.shape[1] != text_dim:
        raise ValueError(f"pooled caption embeddings must be [N, {text_dim}], got shape {tuple(pooled.shape)}")
    if images.shape[0] != pooled.shape[0]:
        raise ValueError(
            f"images and pooled caption embeddings disagree in length: {images.shape[0]} images, "
            f"{pooled.shape[0]} captions"
        )
    if images.shape[0] < 2:
        raise ValueError(f"need at least 2 image-caption pairs (a contrastive batch needs negatives), got {images.shape[0]}")
    if images.is_floating_point() and images.numel() and images.abs().amax() > 1.0 + 1e-3:
        # Catches [0, 255] floats, which would train or score on saturated inputs without any error.
        raise ValueError(f"float images must lie in [-1, 1], got values up to {images.abs().amax().item():.3g}")


# -----------------------------------------------------------------------------
# Scores
# -----------------------------------------------------------------------------

@torch.no_grad()
def probe_scores(probe: AlignmentProbe, images: Tensor, pooled: Tensor, group: int = 100, seed: int = 0) -> dict:
    """probe_score (mean image-own-caption cosine) and probe_r1 (caption R@1 within seeded groups); see the module doc."""
    check_pairs(images, pooled, probe.config.text_dim)
    if group < 2:
        raise ValueError(f"retrieval group must hold at least 2 captions, got {group}")
    was_training = probe.training
    probe.eval()
    try:
        image_emb = torch.cat([probe.encode_images(chunk) for chunk in images.split(SCORE_BATCH)])
        text_emb = probe.encode_texts(pooled)
    finally:
        probe.train(was_training)
    same_caption = F.normalize(pooled.float(), dim=-1).to(text_emb.device)
    hits = sum(
        int(retrieval_hits(image_emb[rows], text_emb[rows], same_caption[rows]).sum())
        for rows in retrieval_groups(images.shape[0], group, seed)
    )
    count = images.shape[0]
    return {
        "probe_score": float((image_emb * text_emb).sum(dim=-1).mean()),
        "probe_r1": hits / count,
        "samples": count,
        "group": group,
    }


def retrieval_groups(count: int, group: int, seed: int) -> list[Tensor]:
    """Row indices of the retrieval groups: a seeded permutation cut into `group`s, the partial tail merged."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    full = count // group
    if full <= 1:
        return [order]  # one group: fewer than 2 * group rows, so a tail would be merged into it anyway
    groups = list(order[: full * group].split(group))
    # Merged rather than dropped: every image counts, and the larger group only makes R@1 harder.
    groups[-1] = torch.cat([groups[-1], order[full * group :]])
    return groups


def retrieval_hits(image_emb: Tensor, text_emb: Tensor, caption_keys: Tensor) -> Tensor:
    """Per image of one group, whether a copy of its own caption outranks every other caption (bool [G])."""
    similarity = image_emb @ text_emb.T
    # Copies of one caption are found by their frozen embeddings, so a repeated prompt is one caption.
    same = caption_keys @ caption_keys.T >= SAME_CAPTION_COSINE
    same |= torch.eye(len(same), dtype=torch.bool, device=same.device)
    best_own = similarity.masked_fill(~same, -math.inf).amax(dim=1)
    best_other = similarity.masked_fill(same, -math.inf).amax(dim=1)
    return best_own > best_other


# -----------------------------------------------------------------------------
# Checkpoints
# -----------------------------------------------------------------------------

def save_probe(probe: AlignmentProbe, folder: str | Path) -> Path:
    """Write the probe as a checkpoint folder (weights, then config.json)."""
    return save_model(probe, folder)


def load_probe(folder: str | Path) -> AlignmentProbe:
    """The probe saved in `folder`, on CPU, in eval mode; CheckpointError names a bad file."""
    return load_model(folder, ProbeConfig.from_dict, AlignmentProbe, "alignment probe")
