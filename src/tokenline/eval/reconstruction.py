"""Reconstruction quality of a 1D tokenizer: the numbers behind the ``recon_eval`` stage.

Three parts:

* ``image_metrics``: PSNR, SSIM and reconstruction FID (rFID) of reconstructions against their originals;
* ``code_statistics``: how many bits the tokens carry and how much of the code space they use;
* ``evaluate_reconstruction``: runs a tokenizer over a shards split and returns both, plus a picture of
  originals above their reconstructions.

Images enter as float tensors [N, 3, H, W] in [-1, 1] (the tokenizer's range) and are mapped to [0, 1]
for the metrics, which all use ``data_range=1.0``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from tokenline.data.stages import iter_shard_samples
from tokenline.eval.fid_inception import frechet_inception_distance
from tokenline.tokenizer.pixels import batched, image_to_tensor, tensor_to_image

__all__ = ["code_statistics", "evaluate_reconstruction", "image_metrics"]

METRIC_BATCH = 32           # images per update() of the torchmetrics metrics
FID_MIN_SAMPLES = 2         # FID needs a covariance on each side, hence at least two images
GUTTER = (200, 200, 200)    # light gray between grid cells, so white images do not run together

CODEBOOK_QUANTIZERS = ("vq", "softvq")


# -----------------------------------------------------------------------------
# Image metrics
# -----------------------------------------------------------------------------

def _unit_range(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1] float32 on the CPU, clipped the way a saved image would be."""
    return ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def _check_pair(originals: Tensor, reconstructions: Tensor) -> None:
    """Both [N, 3, H, W] with equal shapes."""
    if originals.ndim != 4 or originals.shape[1] != 3:
        raise ValueError(f"originals must be [N, 3, H, W], got {list(originals.shape)}")
    if originals.shape != reconstructions.shape:
        raise ValueError(
            f"reconstructions {list(reconstructions.shape)} do not match originals {list(originals.shape)}"
        )


def image_metrics(originals: Tensor, reconstructions: Tensor, fid: bool = True) -> dict[str, Any]:
    """PSNR, SSIM and rFID of reconstructions against originals, both [N, 3, H, W] floats in [-1, 1]."""
    # Keys:
    #   psnr     dB, from the mean squared error pooled over every pixel of the set (torchmetrics'
    #            default reduction), not a mean of per-image PSNRs. Identical sets give float('inf').
    #   ssim     mean per-image SSIM (Gaussian 11x11 window, sigma 1.5), 1.0 for identical images.
    #   rfid     FID with originals as the real set and reconstructions as the fake set, on the 2048-d
    #            pool features of the standard (offline) FID InceptionV3; None when fid=False or N < 2.
    #            Returned as computed: identical sets give about +-1e-4, not exactly 0, because the
    #            covariances of N << 2048 images are singular and the matrix square root is taken through
    #            eigenvalues of their product, some of which come out as tiny negative/complex round-off.
    #   rfid_note  only when rfid is None for lack of images: why.
    #   samples  N.
    from torchmetrics.image import (
        PeakSignalNoiseRatio,
        StructuralSimilarityIndexMeasure,
    )

    _check_pair(originals, reconstructions)
    count = len(originals)
    if count == 0:
        raise ValueError("image_metrics needs at least one image")
    real, fake = _unit_range(originals), _unit_range(reconstructions)

    psnr = PeakSignalNoiseRatio(data_range=1.0)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    for start in range(0, count, METRIC_BATCH):
        stop = start + METRIC_BATCH
        psnr.update(fake[start:stop], real[start:stop])
        ssim.update(fake[start:stop], real[start:stop])
    out: dict[str, Any] = {
        # float() turns a 0-d tensor into a Python float; a zero error becomes float('inf'), not an error.
        "psnr": float(psnr.compute()),
        "ssim": float(ssim.compute()),
        "rfid": None,
    }

    if fid and count < FID_MIN_SAMPLES:
        out["rfid_note"] = (
            f"rFID needs at least {FID_MIN_SAMPLES} images per side to estimate a covariance; got {count}"
        )
    elif fid:
        # rFID on a val split of a few hundred images is biased upward against the usual 50k-image protocol
        # (FID's bias grows as the sample shrinks, and 2048-d covariances from so few images are low-rank),
        # so it is comparable only between runs that use the same val split, never with published numbers.

        metric = frechet_inception_distance(feature=2048, normalize=True)  # normalize: float input in [0, 1]
        with torch.no_grad():
            for start in range(0, count, METRIC_BATCH):
                metric.update(real[start : start + METRIC_BATCH], real=True)
                metric.update(fake[start : start + METRIC_BATCH], real=False)
            out["rfid"] = float(metric.compute())
    out["samples"] = count
    return out


# -----------------------------------------------------------------------------
# Code statistics
# -----------------------------------------------------------------------------

def _binary_entropy_bits(p: Tensor) -> Tensor:
    """Entropy in bits of Bernoulli(p), elementwise, with 0 log 0 = 0."""
    return (torch.special.entr(p) + torch.special.entr(1.0 - p)) / math.log(2.0)


def code_statistics(
    quantizer: str, codes: Tensor | None, codebook_size: int | None, num_tokens: int, token_dim: int
) -> dict[str, Any]:
    """Bits per image and code-space usage of a set of codes (vq/softvq [N, K] ids, binary [N, K, D] bits, kl None)."""
    # Keys:
    #   tokens_per_image  K.
    #   bits_per_image    vq/softvq: K * log2(codebook_size); binary: K * D; kl: None (continuous latents).
    #   code_usage        vq/softvq: share of codebook entries used at least once;
    #                     binary: share of the K * D bit positions that take both values across the set;
    #                     kl: None.
    #   codes_used, perplexity   vq/softvq: distinct codes used, and exp(entropy) of their histogram
    #                            (the number of equally used codes the histogram is worth).
    #   bit_entropy       binary: mean over positions of the entropy (bits) of that position's share of ones.
    #   latent_floats_per_image  kl: K * D.
    out: dict[str, Any] = {"tokens_per_image": num_tokens}
    if quantizer == "kl":
        out |= {"bits_per_image": None, "code_usage": None, "latent_floats_per_image": num_tokens * token_dim}
        return out
    if quantizer not in (*CODEBOOK_QUANTIZERS, "binary"):
        raise ValueError(f"unknown quantizer kind {quantizer!r}; expected vq, softvq, binary or kl")
    if codes is None or codes.numel() == 0:
        raise ValueError(f"the {quantizer!r} quantizer needs a non-empty codes tensor for its statistics")
    codes = codes.detach().cpu()

    if quantizer == "binary":
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (num_tokens, token_dim):
            raise ValueError(f"binary codes must be [N, {num_tokens}, {token_dim}], got {list(codes.shape)}")
        ones = codes.bool().double().mean(dim=0)  # [K, D] share of ones per bit position
        out |= {
            "bits_per_image": num_tokens * token_dim,
            "code_usage": float(((ones > 0) & (ones < 1)).double().mean()),
            "bit_entropy": float(_binary_entropy_bits(ones).mean()),
        }
        return out

    if not codebook_size or codebook_size < 1:
        raise ValueError(f"the {quantizer!r} quantizer needs codebook_size >= 1, got {codebook_size!r}")
    if codes.ndim != 2 or codes.shape[1] != num_tokens:
        raise ValueError(f"{quantizer} codes must be [N, {num_tokens}], got {list(codes.shape)}")
    flat = codes.long().flatten()
    if int(flat.min()) < 0 or int(flat.max()) >= codebook_size:
        raise ValueError(f"codes lie outside [0, {codebook_size}): min {int(flat.min())}, max {int(flat.max())}")
    counts = torch.bincount(flat, minlength=codebook_size).double()
    share = counts / counts.sum()
    used = int((counts > 0).sum())
    out |= {
        "bits_per_image": num_tokens * math.log2(codebook_size),
        "code_usage": used / codebook_size,
        "codes_used": used,
        "perplexity": float(torch.special.entr(share).sum().exp()),
    }
    return out


# -----------------------------------------------------------------------------
# Evaluation over a shards split
# -----------------------------------------------------------------------------

def _reconstruction_grid(originals: Tensor, reconstructions: Tensor) -> Image.Image:
    """Originals side by side in the top row, their reconstructions below, at pixel size, 1-pixel gutters."""
    count, _, height, width = originals.shape
    sheet = Image.new("RGB", (count * (width + 1) + 1, 2 * (height + 1) + 1), GUTTER)
    for row, images in enumerate((originals, reconstructions)):
        for column in range(count):
            sheet.paste(tensor_to_image(images[column]), (column * (width + 1) + 1, row * (height + 1) + 1))
    return sheet


def _codebook_size(tokenizer) -> int | None:
    """Entries in the tokenizer's codebook (quantizer_options may override config.codebook_size), or None."""
    codebook = getattr(tokenizer.quantizer, "codebook", None)
    return int(codebook.shape[0]) if codebook is not None else None


def _reconstruct(tokenizer, shard_dir: Path, split: str, text_for, batch_size: int, max_samples: int | None
                 ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Each batch of the split through encode and decode: (original batches, reconstructed batches, code batches)."""
    config = tokenizer.config
    device = next(tokenizer.parameters()).device
    was_training = tokenizer.training
    tokenizer.eval()  # no dropout, and quantizers skip their training-only bookkeeping (usage EMA, restarts)

    originals, reconstructions, codes = [], [], []
    samples = iter_shard_samples(shard_dir, split)
    progress = tqdm(desc=f"recon_eval {split}", unit="img", total=max_samples)
    try:
        with torch.no_grad():
            for batch in batched(samples, batch_size, max_samples):
                images = torch.stack([image_to_tensor(sample["image"]) for sample in batch])
                if tuple(images.shape[-2:]) != (config.image_size, config.image_size):
                    raise ValueError(
                        f"{shard_dir} ({split}): images are {tuple(images.shape[-2:])}, the tokenizer expects "
                        f"{config.image_size}x{config.image_size}"
                    )
                text = text_for([sample["caption"] for sample in batch]) if text_for is not None else None
                quantized = tokenizer.encode(images.to(device), text)
                # Decode the latents the decoder really sees (the same path as forward()), not re-looked-up codes.
                recon = tokenizer.decode(quantized.latents, text)
                originals.append(images)
                reconstructions.append(recon.float().cpu())
                if quantized.codes is not None:
                    codes.append(quantized.codes.cpu())
                progress.update(len(batch))
    finally:
        progress.close()
        tokenizer.train(was_training)

    return originals, reconstructions, codes


def evaluate_reconstruction(
    tokenizer,
    shard_dir: str | Path,
    split: str = "val",
    text_for: Callable[[list[str]], Any] | None = None,
    batch_size: int = 32,
    max_samples: int | None = None,
    grid: int = 8,
) -> tuple[dict[str, Any], Image.Image | None]:
    """Reconstruct a shards split through the tokenizer: (image_metrics | code_statistics | split, grid image)."""
    # text_for(captions) returns the tokenizer's text argument for a batch (text-conditioned tokenizers), or
    # None. The grid image holds the first `grid` originals above their reconstructions; it is None when
    # grid <= 0. A split without samples is an error: metrics over nothing would be silently meaningless.

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    shard_dir = Path(shard_dir)
    config = tokenizer.config
    originals, reconstructions, codes = _reconstruct(tokenizer, shard_dir, split, text_for, batch_size, max_samples)
    if not originals:
        raise ValueError(f"{shard_dir}: the {split!r} split has no samples to evaluate")
    originals_t, reconstructions_t = torch.cat(originals), torch.cat(reconstructions)
    metrics = image_metrics(originals_t, reconstructions_t) | code_statistics(
        config.quantizer,
        torch.cat(codes) if codes else None,
        _codebook_size(tokenizer),
        config.num_tokens,
        config.token_dim,
    )
    metrics["split"] = split
    shown = min(grid, len(originals_t))
    picture = _reconstruction_grid(originals_t[:shown], reconstructions_t[:shown]) if shown > 0 else None
    return metrics, picture
