"""Print throughput of the tokenizer's training step and the frozen text encoder on this machine.

Usage: .venv/bin/python -m benchmarks building_blocks [--steps N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def tokenizer_step_throughput(size: str, image_size: int, tokens: int, batch: int, steps: int) -> dict:
    """Median images/s of forward + backward + AdamW step for one tokenizer size."""
    from tokenline.tokenizer.model import TOKENIZER_SIZES

    model = TOKENIZER_SIZES[size](image_size=image_size, num_tokens=tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, image_size, image_size) * 2 - 1
    timings = []
    for step in range(steps + 2):
        started = time.perf_counter()
        reconstruction, quantized = model(images)
        loss = torch.nn.functional.mse_loss(reconstruction, images) + quantized.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 2:  # the first steps pay for allocation and kernel selection
            timings.append(time.perf_counter() - started)
    return {"params_M": model.num_params() / 1e6, "images_per_s": batch / statistics.median(timings)}


def text_encoder_throughput(batch: int, repeats: int) -> dict:
    """Captions/s of MiniLM on short captions, and its load time."""
    from tokenline.text import MiniLMEncoder

    started = time.perf_counter()
    encoder = MiniLMEncoder()
    load_s = time.perf_counter() - started
    captions = [f"an emoji of a red circle number {i}" for i in range(batch)]
    encoder.encode(captions)
    started = time.perf_counter()
    for _ in range(repeats):
        encoder.encode(captions, batch_size=batch)
    return {"load_s": load_s, "captions_per_s": batch * repeats / (time.perf_counter() - started)}


def main() -> None:
    """Run both measurements and print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for size in ("T", "S"):
        result = tokenizer_step_throughput(size, image_size=64, tokens=32, batch=32, steps=args.steps)
        print(f"Tokenizer_{size} 64px K=32 batch 32 train step: {result['images_per_s']:.1f} images/s ({result['params_M']:.2f} M params)")
    text = text_encoder_throughput(batch=64, repeats=5)
    print(f"MiniLM: load {text['load_s']:.1f} s, {text['captions_per_s']:.0f} short captions/s (batch 64)")


if __name__ == "__main__":
    main()
