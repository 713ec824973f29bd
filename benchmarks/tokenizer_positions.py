"""The 1D tokenizer's position init and token routing, val PSNR every 100 steps of pixel training:
tiny random positions ("random") vs 2D sin-cos patch positions with unit-scale latent tokens ("sincos",
the default since 2026-11-30), 1D tokens formed by fixed learned mixing of the patches instead of
attention ("mix", layout "1d-mix"), and the 8 × 8 grid for reference ("grid").

A plain loop (L1 + L2, kl latents K = 32, D = 12, the cpu profile's width-128 T, batch 32, AdamW
1e-3 with 100 warm-up steps, no GAN) on the OpenMoji shards of a project root, so the two inits
differ in nothing else; both use seed 0 for weights and batches.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks tokenizer_positions [--variant sincos|random|mix|grid] [--tokens 32] [--token-dim 12]
       [--steps 600] [--shards data/openmoji/shards]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import REPO, setup_threads
from tokenline.data.shards import iter_shard_samples
from tokenline.tokenizer.model import Tokenizer1D, TokenizerConfig
from tokenline.tokenizer.pixels import samples_to_batch


def build(variant: str, tokens: int = 32, token_dim: int = 12) -> Tokenizer1D:
    """The tokenizer with today's init ("sincos"), the one before it ("random": every position and latent token
    N(0, 0.02²)), layout "1d-mix" ("mix") or the 8 × 8 grid ("grid", 64 tokens, the ceiling)."""
    torch.manual_seed(0)
    layout = {"mix": "1d-mix", "grid": "grid"}.get(variant, "1d")
    tokens = 64 if variant == "grid" else tokens
    model = Tokenizer1D(TokenizerConfig(width=128, depth=3, heads=4, num_tokens=tokens, token_dim=token_dim, quantizer="kl",
                                        layout=layout))
    if variant == "random":
        with torch.no_grad():
            for parameter in (model.patch_pos, model.mask_pos, model.latent_tokens, model.latent_pos):
                parameter.normal_(0, 0.02)
    return model


def val_psnr(model: Tokenizer1D, val: torch.Tensor) -> float:
    """Mean PSNR (dB, images in [0, 1]) of the val reconstructions."""
    model.eval()
    with torch.no_grad():
        reconstruction, _ = model(val)
    model.train()
    mse = ((reconstruction.clamp(-1, 1) - val) / 2).square().mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1 / mse)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("sincos", "random", "mix", "grid"), default="sincos")
    parser.add_argument("--tokens", type=int, default=32, help="K latent tokens")
    parser.add_argument("--token-dim", type=int, default=12, help="D, floats per token")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--shards", type=Path, default=REPO / "data" / "openmoji" / "shards")
    args = parser.parse_args()
    setup_threads(1)
    train = samples_to_batch(list(iter_shard_samples(args.shards, "train")), 64)
    val = samples_to_batch(list(iter_shard_samples(args.shards, "val")), 64)
    model = build(args.variant, args.tokens, args.token_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    batches = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        images = train[torch.randint(len(train), (32,), generator=batches)]
        reconstruction, quantized = model(images)
        loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + quantized.loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            print(f"{args.variant} step {step} loss {loss.item():.4f} val_psnr {val_psnr(model, val):.2f} "
                  f"t {time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
