"""bf16 autocast on the CPU (math attention backend, fused AdamW) against fp32: step speed, loss curves and final metrics.

Two parts, both on the cpu profile (OpenMoji 64 px unless `--dataset`):

* **speed**: one training step (forward, loss, backward, clip, AdamW) of the cpu-profile
  tokenizer, masked generator and flow generator, fp32 and bf16 alternating in this process
  (`--pairs` pairs of `--block` steps each, after a warm-up); the figure is the median of the
  per-pair ratios, which cancels slow drifts of a shared machine. bf16 steps run as the loops run
  them under `mixed_precision: bf16` (tokenline.precision.step_context, fused AdamW).
* **quality**: the real pipeline in two scratch roots, one per precision: `tokenizer` +
  `recon_eval`, then `generator` (the profile's objective), with MLflow on so that each run's
  loss curve can be read back. Printed: the mean loss over the last `--tail` logged steps,
  images or samples per second, and recon_eval's PSNR / SSIM / rFID.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks cpu_bf16 [--root DIR] [--skip-quality]
       [--pairs 7] [--block 5] [--tail 100] [--steps N] [--profile cpu] [--dataset openmoji] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import (
    WORK,
    add_common_arguments,
    bench_params,
    fmt,
    markdown_table,
    prepare_root,
    run_stages,
    seed_sources,
    setup_threads,
    training_summary,
    write_json,
)
from tokenline.layout import output_path, report_path

PRECISIONS = ("fp32", "bf16")


# -----------------------------------------------------------------------------
# Speed: alternating single steps
# -----------------------------------------------------------------------------

def _tokenizer_step(params, shard_dir: Path, device: str = "cpu"):
    """A closure that trains the profile's tokenizer one step on the next batch of real images (on `device`)."""
    from tokenline.tokenizer.model import Tokenizer1D
    from tokenline.tokenizer.spec import tokenizer_config
    from tokenline.tokenizer.train import ShardImages

    torch.manual_seed(0)
    model = Tokenizer1D(tokenizer_config(params, 0)).train().to(device)
    data = ShardImages(shard_dir)
    batch = params.tokenizer.train.batch_size

    def loss_of(step: int):
        rows = torch.arange(step * batch, (step + 1) * batch) % len(data.images)
        images = data.images[rows].to(device).float() / 127.5 - 1.0
        reconstruction, quantized = model(images)
        reconstruction = reconstruction.float()
        return F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + quantized.loss.float()

    return model, loss_of


def _generator_step(params, objective: str, device: str = "cpu"):
    """A closure that trains the profile's generator of `objective` one step on random tokens and captions (on `device`)."""
    from tokenline.generator.model import GeneratorConfig, TextBatch, build_generator
    from tokenline.generator.objectives import flow_matching_loss, masked_token_loss
    from tokenline.generator.spec import generator_config_values

    t = params.tokenizer
    quantizer = "vq" if objective == "masked" else "kl"
    meta = {"quantizer": quantizer, "num_tokens": t.num_tokens, "token_dim": 12,
            "codebook_size": t.model.get("codebook_size", 1024) if objective == "masked" else None,
            "text_dim": 384, "text_pooled_dim": 384, "text_tokens": t.text_tokens, "tokenizer_hash": ""}
    values = generator_config_values(params, meta) | {"objective": objective}
    torch.manual_seed(0)
    model = build_generator(GeneratorConfig.from_dict(values)).train().to(device)
    batch = params.generator.train.batch_size
    generator = torch.Generator().manual_seed(0)
    text = TextBatch(torch.randn(batch, t.text_tokens, 384, generator=generator).to(device),
                     torch.ones(batch, t.text_tokens, dtype=torch.bool).to(device),
                     torch.randn(batch, 384, generator=generator).to(device))

    def loss_of(step: int):
        if objective == "masked":
            codes = torch.randint(0, model.config.codebook_size, (batch, t.num_tokens), generator=generator)
            return masked_token_loss(model, codes.to(device), text)
        return flow_matching_loss(model, torch.randn(batch, t.num_tokens, 12, generator=generator).to(device), text)

    return model, loss_of


def _runner(model, loss_of, precision: str, lr: float):
    """One training step in `precision`, as the pipeline's loops take it."""
    bf16 = precision == "bf16"
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True if bf16 else None)

    def step(index: int) -> None:
        attention = sdpa_kernel(SDPBackend.MATH) if bf16 else contextlib.nullcontext()
        with attention, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(index)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a square matmul in `dtype` on this process's threads: the peak MFU is measured against."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def step_flops(build) -> int:
    """Model FLOPs of one training step (forward and backward, counted by torch's FlopCounterMode in fp32)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, loss_of = build()
    with FlopCounterMode(display=False) as counter:
        loss_of(0).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def timed_pairs(build, lr: float, pairs: int, block: int) -> dict:
    """Seconds per step of fp32 and bf16 alternating (each its own model copy and optimizer); medians and the pair ratio."""
    steps = {precision: _runner(*build(), precision, lr) for precision in PRECISIONS}
    for precision in PRECISIONS:  # warm-up: allocator, kernels, fused optimizer state
        for index in range(2):
            steps[precision](index)
    seconds: dict[str, list[float]] = {precision: [] for precision in PRECISIONS}
    for pair in range(pairs):
        order = PRECISIONS if pair % 2 == 0 else PRECISIONS[::-1]
        for precision in order:
            started = time.perf_counter()
            for index in range(block):
                steps[precision](pair * block + index)
            seconds[precision].append((time.perf_counter() - started) / block)
    ratios = [fp32 / bf16 for fp32, bf16 in zip(seconds["fp32"], seconds["bf16"])]
    flops = step_flops(build)
    fp32_s, bf16_s = statistics.median(seconds["fp32"]), statistics.median(seconds["bf16"])
    return {"fp32_s": fp32_s, "bf16_s": bf16_s, "speedup": statistics.median(ratios), "step_gflop": flops / 1e9,
            "mfu_fp32": flops / fp32_s / PEAKS["fp32"], "mfu_bf16": flops / bf16_s / PEAKS["bf16"]}


PEAKS: dict[str, float] = {}  # precision -> measured matmul FLOP/s (main fills it first)


# -----------------------------------------------------------------------------
# Quality: the pipeline in each precision
# -----------------------------------------------------------------------------

def _loss_tail(root: Path, run_id: str, tail: int) -> float | None:
    """The mean `loss` over the last `tail` steps MLflow logged for a stage run."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    values = [m.value for m in history[-tail:]]
    return sum(values) / len(values) if values else None


def quality(args, precision: str) -> dict:
    """Train tokenizer and generator through the pipeline in `precision`; their figures."""
    from tokenline.pipeline import get_stage
    from tokenline.runner import run_with_upstream

    root = args.root / precision
    prepare_root(root, seed_sources(args), args.dataset, ["captions", "teacher_tokenizer"])
    sets = [*args.overrides, "tracking.enabled=true", f"tracking.uri=sqlite:///{root / 'mlruns.db'}"]
    if precision == "bf16":
        sets += ["tokenizer.train.mixed_precision=bf16", "generator.train.mixed_precision=bf16"]
    if args.steps:
        sets += [f"tokenizer.train.steps={args.steps}", f"generator.train.steps={args.steps}"]
    params = bench_params(root, args.profile, args.dataset, sets)
    run_stages(root, params, args.dataset, ["teacher_tokenizer"])  # shared recipe, trained in fp32 in both roots
    run_ids = {}
    for stage in ("recon_eval", "generator"):
        for run in run_with_upstream(get_stage(stage), params, args.dataset, root):
            if not run.skipped:
                run_ids[run.stage] = run.mlflow_run_id
    recon = json.loads(report_path(root, args.dataset, "recon_eval").read_text())
    tokenizer, generator = training_summary(root, args.dataset, "tokenizer"), training_summary(root, args.dataset, "generator")
    return {
        "precision": precision,
        "tokenizer_loss_tail": _loss_tail(root, run_ids.get("tokenizer"), args.tail) if run_ids.get("tokenizer") else None,
        "tokenizer_images_per_s": tokenizer["images_per_s"], "tokenizer_s": tokenizer["wall_time_s"],
        "psnr": recon["psnr"], "ssim": recon["ssim"], "rfid": recon["rfid"],
        "generator_loss_tail": _loss_tail(root, run_ids.get("generator"), args.tail) if run_ids.get("generator") else None,
        "generator_samples_per_s": generator["samples_per_s"], "generator_s": generator["wall_time_s"],
        "generator": str(output_path(root, args.dataset, "generator")),
    }


def main() -> None:
    """Time the steps, then (unless --skip-quality) train both lineages; print two tables, write results.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, WORK / "cpu_bf16", "openmoji")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--tail", type=int, default=100, help="logged steps averaged for the loss figure")
    parser.add_argument("--steps", type=int, default=None, help="tokenizer and generator steps (default: the profile's)")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    setup_threads(args.threads)
    args.root.mkdir(parents=True, exist_ok=True)
    prepare_root(args.root, seed_sources(args), args.dataset, ["shards"])
    params = bench_params(args.root, args.profile, args.dataset, args.overrides)
    run_stages(args.root, params, args.dataset, ["shards"])
    shard_dir = output_path(args.root, args.dataset, "shards")

    PEAKS.update(fp32=matmul_peak(torch.float32), bf16=matmul_peak(torch.bfloat16))
    print(f"matmul peak: fp32 {PEAKS['fp32'] / 1e9:.1f} GFLOP/s, bf16 {PEAKS['bf16'] / 1e9:.1f} GFLOP/s", flush=True)
    speed = {
        "tokenizer": timed_pairs(lambda: _tokenizer_step(params, shard_dir), params.tokenizer.train.lr, args.pairs, args.block),
        "masked generator": timed_pairs(lambda: _generator_step(params, "masked"), params.generator.train.lr, args.pairs, args.block),
        "flow generator": timed_pairs(lambda: _generator_step(params, "flow"), params.generator.train.lr, args.pairs, args.block),
    }
    for name, figures in speed.items():
        print(name, figures, flush=True)
    rows = [] if args.skip_quality else [quality(args, precision) for precision in PRECISIONS]
    write_json(args.root / "results.json", {"speed": speed, "peaks": PEAKS, "quality": rows,
                                            "threads": torch.get_num_threads()})

    print(f"\nprofile {args.profile}, {args.dataset}, {torch.get_num_threads()} thread(s); {args.pairs} pairs of "
          f"{args.block} steps, median of per-pair ratios")
    print(f"matmul peak: fp32 {PEAKS['fp32'] / 1e9:.1f} GFLOP/s, bf16 {PEAKS['bf16'] / 1e9:.1f} GFLOP/s "
          "(1024 x 1024); MFU = model FLOPs per step / s per step / the peak of the same precision")
    print(markdown_table(["model", "GFLOP / step", "fp32 s/step", "bf16 s/step", "bf16 speed-up", "MFU fp32", "MFU bf16"],
                         [[name, fmt(f["step_gflop"], ".2f"), fmt(f["fp32_s"], ".3f"), fmt(f["bf16_s"], ".3f"),
                           fmt(f["speedup"], ".2f") + "x", fmt(100 * f["mfu_fp32"], ".0f") + " %",
                           fmt(100 * f["mfu_bf16"], ".0f") + " %"] for name, f in speed.items()]))
    if rows:
        print()
        print(markdown_table(
            ["precision", f"tokenizer loss (last {args.tail})", "tokenizer img/s", "PSNR", "SSIM", "rFID",
             f"generator loss (last {args.tail})", "generator samples/s"],
            [[r["precision"], fmt(r["tokenizer_loss_tail"], ".4f"), fmt(r["tokenizer_images_per_s"], ".1f"),
              fmt(r["psnr"], ".2f"), fmt(r["ssim"], ".3f"), fmt(r["rfid"], ".1f"), fmt(r["generator_loss_tail"], ".4f"),
              fmt(r["generator_samples_per_s"], ".1f")] for r in rows]))


if __name__ == "__main__":
    main()
