"""Images/s of the pipeline's tokenizer loop next to a bare PyTorch loop of the same model.

Both loops train the same tokenizer on the same shards in this process with the same objective
(L1 + L2 + quantizer loss, AdamW); the pipeline loop adds what it is for: accelerate, EMA,
warm-up/cosine schedule, gradient clipping, the progress bar, step logging and a final
checkpoint. The discriminator is off in both, so the comparison is the loop, not the loss.
Runs alternate (bare, pipeline, bare, ...) so machine noise hits both alike. Goal: >= 0.90x.

Usage: .venv/bin/python -m benchmarks train_loop_overhead [--steps 60] [--repeats 7] [--size T]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenline.params_loading import load_params
from tokenline.layout import output_path
from tokenline.pipeline import get_stage
from tokenline.runner import run_with_upstream
from tokenline.tokenizer.model import TOKENIZER_SIZES
from tokenline.tokenizer.train import (
    LossConfig,
    ShardImages,
    TrainConfig,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]


def shards_folder(root: Path, dataset: str) -> Path:
    """The cpu-profile shards of `dataset` (built by the pipeline when missing)."""
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    params = load_params(root / "params.yaml", profile="cpu", overrides=["tracking.enabled=false"], dataset=dataset)
    run_with_upstream(get_stage("shards"), params, dataset, root)
    return output_path(root, dataset, "shards")


def bare_loop(model, shard_dir: Path, steps: int, batch: int, warmup: int) -> float:
    """Images/s of a plain loop: DataLoader, forward, loss, backward, AdamW."""
    loader = torch.utils.data.DataLoader(ShardImages(shard_dir), batch_size=batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    batches = iter(loader)
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        images, _ = next(batches)
        reconstruction, quantized = model(images)
        loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + quantized.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - started)


def pipeline_loop(model, shard_dir: Path, steps: int, batch: int, warmup: int) -> float:
    """Images/s of tokenline's train_tokenizer over the same steps (its own timing, warm-up excluded)."""
    config = TrainConfig(steps=warmup + steps, batch_size=batch, warmup_steps=5, checkpoint_every=10**9,
                         log_every=10, loss=LossConfig(adversarial=0.0, perceptual=0.0))
    times = {}

    def log_fn(step, metrics):
        times[step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as scratch:
        train_tokenizer(model, shard_dir, scratch, config, log_fn=log_fn)
    # From the first log point at or after the warm-up to the last: checkpoint writing is excluded
    # here and reported by the pipeline's own wall time instead.
    first = min(s for s in times if s >= warmup)
    last = max(times)
    return (last - first) * batch / (times[last] - times[first])


def main() -> None:
    """Alternate both loops and print median images/s and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", default="T")
    parser.add_argument("--dataset", default="openmoji")
    parser.add_argument("--root", type=Path, default=REPO / "benchmarks" / ".work" / "loop")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    shard_dir = shards_folder(args.root, args.dataset)
    image_size = ShardImages(shard_dir).images.shape[-1]

    def fresh_model():
        torch.manual_seed(0)
        return TOKENIZER_SIZES[args.size](image_size=image_size, num_tokens=32)

    bare, pipeline = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(fresh_model(), shard_dir, args.steps, args.batch, args.warmup))
        pipeline.append(pipeline_loop(fresh_model(), shard_dir, args.steps, args.batch, args.warmup))
        print(f"bare {bare[-1]:.1f} img/s   pipeline {pipeline[-1]:.1f} img/s   "
              f"ratio {pipeline[-1] / bare[-1]:.3f}", flush=True)
    b, p = statistics.median(bare), statistics.median(pipeline)
    # Neighbouring runs share the machine's state, so the per-pair ratio is steadier than the
    # ratio of medians when throughput drifts during the benchmark.
    paired = statistics.median(q / r for q, r in zip(pipeline, bare))
    print(f"\nTokenizer_{args.size} at {image_size} px, K = 32, batch {args.batch}, {args.steps} timed steps, "
          f"median of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"bare PyTorch loop: {b:.1f} images/s")
    print(f"pipeline loop:     {p:.1f} images/s")
    print(f"ratio of medians:  {p / b:.3f}x")
    print(f"median pair ratio: {paired:.3f}x (goal >= 0.90x)")


if __name__ == "__main__":
    main()
