"""GPU box check: export + parity + prompt -> image ms/image on CUDA (onnxruntime-gpu), and the bf16 training steps on CUDA.

Run it as `benchmarks/gpu_check.sh` right after `pip install -e '.[gpu]'` on a GPU machine. It
builds a small lineage (`--profile tiny`, `--dataset shapes` by default) in a scratch root up to
the `export` stage, then prints:

* the environment: torch and its CUDA device, onnxruntime and its execution providers;
* the export's parity (max |torch - onnxruntime| in [0, 1]) and the providers it was measured on;
* ms/image at batch 1 and 16 through onnxruntime on CUDA and on the CPU, and the largest
  difference between the two providers' images;
* ms per training step of the tokenizer and of the masked and flow generators (the `--step-profile`
  models, cpu by default), fp32 and bf16 autocast on CUDA.

Without CUDA (this project's CPU machine) every CUDA part prints one `skipped:` line saying why,
and the rest runs on the CPU, so the script itself is tested where there is no GPU.

Usage: benchmarks/gpu_check.sh [--root DIR] [--profile tiny] [--dataset shapes] [--step-profile cpu] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import WORK, bench_params, prepare_root, run_stages
from tokenline.export.runtime import PIPELINE_FILE, OnnxBackend, OnnxPipeline
from tokenline.layout import output_path

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle", "a purple square"]
BATCHES = (1, 16)
CUDA_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def environment() -> dict:
    """torch, CUDA and onnxruntime as this process sees them."""
    import onnxruntime

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else None,
            "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}


def skip(what: str, why: str) -> None:
    """One clear line for a part this machine cannot run."""
    print(f"skipped: {what}: {why}", flush=True)


def ms_per_image(pipeline: OnnxPipeline, batch: int, repeats: int = 3) -> float:
    """Median ms/image over `repeats` runs of `batch` prompts (after one warm-up run)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    pipeline.render(prompts)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        pipeline.render(prompts)
        times.append(1000 * (time.perf_counter() - started) / batch)
    return statistics.median(times)


def on(folder: Path, providers: list[str]) -> OnnxPipeline:
    """The exported pipeline with its graphs on these onnxruntime execution providers."""
    return OnnxPipeline(folder, backend=OnnxBackend(folder, providers=providers))


def onnx_figures(folder: Path, cuda_ort: bool) -> dict:
    """ms/image per provider and batch; the CUDA-vs-CPU image difference when CUDA is there."""
    on_cpu = on(folder, ["CPUExecutionProvider"])
    figures: dict = {"cpu": {b: ms_per_image(on_cpu, b) for b in BATCHES}}
    if not cuda_ort:
        skip("onnxruntime on CUDA", "this onnxruntime has no CUDAExecutionProvider (install the gpu extra on a CUDA machine)")
        return figures
    on_cuda = on(folder, CUDA_PROVIDERS)
    figures["cuda"] = {b: ms_per_image(on_cuda, b) for b in BATCHES}
    figures["cuda_vs_cpu_max_abs_diff"] = float(np.abs(on_cuda.render(PROMPTS) - on_cpu.render(PROMPTS)).max())
    return figures


def training_steps(profile: str, root: Path, dataset: str, steps: int) -> dict:
    """ms per training step on CUDA, fp32 and bf16 autocast, for the tokenizer and both generator objectives."""
    from benchmarks.cpu_bf16 import _generator_step, _tokenizer_step

    params = bench_params(root, profile, dataset, [])
    builds = {"tokenizer": lambda: _tokenizer_step(params, output_path(root, dataset, "shards"), "cuda"),
              "masked generator": lambda: _generator_step(params, "masked", "cuda"),
              "flow generator": lambda: _generator_step(params, "flow", "cuda")}
    figures = {}
    for name, build in builds.items():
        for precision in ("fp32", "bf16"):
            model, loss_of = build()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            timings = []
            for index in range(steps + 2):  # two warm-up steps: kernels, allocator, optimizer state
                torch.cuda.synchronize()
                started = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = loss_of(index)
                loss.float().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                timings.append(time.perf_counter() - started)
            figures[f"{name} {precision}"] = 1000 * statistics.median(timings[2:])
    return figures


def main() -> None:
    """Build the lineage up to export, then print the environment, parity, ms/image and training-step figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=WORK / "gpu_check")
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--step-profile", default="cpu", help="the profile whose model sizes the training steps time")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per model and precision")
    args = parser.parse_args()

    env = environment()
    print(f"torch {env['torch']}  CUDA: {env['device'] or 'none'}", flush=True)
    print(f"onnxruntime {env['onnxruntime']}  providers: {', '.join(env['providers'])}", flush=True)
    cuda_ort = "CUDAExecutionProvider" in env["providers"]

    prepare_root(args.root, [], args.dataset, ["export"])
    built = run_stages(args.root, bench_params(args.root, args.profile, args.dataset, []), args.dataset, ["export"])
    print(f"export: built {', '.join(built['ran']) or 'nothing (fresh)'} in {built['wall_s']:.0f} s", flush=True)
    folder = output_path(args.root, args.dataset, "onnx")
    parity = json.loads((folder / PIPELINE_FILE).read_text())["parity"]
    print(f"parity: max |torch - onnxruntime| = {parity['max_abs_diff']:.2e} on {', '.join(parity['providers'])}", flush=True)

    onnx = onnx_figures(folder, cuda_ort)
    for provider in ("cpu", "cuda"):
        if provider in onnx:
            shown = "  ".join(f"batch {b}: {onnx[provider][b]:.1f} ms/image" for b in BATCHES)
            print(f"onnxruntime {provider}: {shown}", flush=True)
    if "cuda_vs_cpu_max_abs_diff" in onnx:
        print(f"onnxruntime cuda vs cpu: max |diff| = {onnx['cuda_vs_cpu_max_abs_diff']:.2e}", flush=True)

    if not env["cuda"]:
        skip("bf16 training steps on CUDA", "torch sees no CUDA device (the CPU figures are benchmarks/cpu_bf16)")
    else:
        for name, ms in training_steps(args.step_profile, args.root, args.dataset, args.steps).items():
            print(f"train step {name}: {ms:.1f} ms", flush=True)
    print("gpu_check: done", flush=True)


if __name__ == "__main__":
    main()
