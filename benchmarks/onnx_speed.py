"""Prompt -> image speed of an exported pipeline: torch eager vs onnxruntime fp32 vs onnxruntime with
the generator (and also the decoder) quantized to int8 (onnxruntime.quantization.quantize_dynamic), at batch 1 and 16.

Every variant runs the same numpy sampler loop (tokenline.export.runtime) on the same prompts and
seeds; only the backend that evaluates the graphs differs. Timings alternate the variants in this
process (`--pairs` rounds, each variant once per round, rotating the order); a variant's figure
is the median of its per-round ratio to torch. Parity is the largest |variant - torch| pixel
difference in [0, 1]; FID (against the dataset's reference set, `--fid-samples` images each) shows
what int8 costs in quality.

Usage: OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks onnx_speed [--folder models/openmoji/onnx]
       [--dataset openmoji] [--threads 2] [--pairs 5] [--fid-samples 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPO, WORK, fmt, markdown_table, reference_set, setup_threads, write_json
from tokenline.artifacts import hash_file
from tokenline.eval.generation import GenerationMetrics
from tokenline.export.generation import open_pipeline
from tokenline.export.runtime import PIPELINE_FILE, OnnxPipeline
from tokenline.tokenizer.pixels import image_to_tensor

BATCHES = (1, 16)


def quantized_copy(folder: Path, into: Path, graphs: tuple[str, ...] = ("generator.onnx",)) -> Path:
    """A copy of the exported folder whose `graphs` are int8 dynamic-quantized (hashes rewritten)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    shutil.copytree(folder, into)
    spec = json.loads((into / PIPELINE_FILE).read_text())
    for graph in graphs:
        quantize_dynamic(str(folder / graph), str(into / graph), weight_type=QuantType.QInt8)
        spec["files"][graph] = hash_file(into / graph)
    (into / PIPELINE_FILE).write_text(json.dumps(spec))
    return into


def timed(pipeline: OnnxPipeline, prompts: list[str], batch: int) -> float:
    """Milliseconds per image for `prompts` in batches of `batch`."""
    started = time.perf_counter()
    for _ in pipeline.generate_batches(prompts, batch_size=batch, unit=True):
        pass
    return 1000 * (time.perf_counter() - started) / len(prompts)


def speed(variants: dict[str, OnnxPipeline], prompts: list[str], pairs: int) -> dict[str, dict[int, dict]]:
    """Per variant and batch: median ms/image and the median per-round speed-up over torch."""
    figures: dict[str, dict[int, dict]] = {name: {} for name in variants}
    names = list(variants)
    for batch in BATCHES:
        count = max(batch, 16)
        chunk = prompts[:count]
        for pipeline in variants.values():  # warm-up: sessions allocate on first run
            timed(pipeline, chunk[:batch], batch)
        rounds: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(pairs):
            order = names[round_index % len(names):] + names[: round_index % len(names)]
            for name in order:
                rounds[name].append(timed(variants[name], chunk, batch))
        for name in names:
            ratios = [base / ms for base, ms in zip(rounds["torch"], rounds[name])]
            figures[name][batch] = {"ms_per_image": statistics.median(rounds[name]),
                                    "speedup": statistics.median(ratios)}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="openmoji")
    parser.add_argument("--folder", type=Path, default=None, help="exported folder (default: models/<dataset>/onnx)")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--fid-samples", type=int, default=200)
    args = parser.parse_args()
    setup_threads(args.threads)
    folder = args.folder or REPO / "models" / args.dataset / "onnx"
    reference = reference_set(REPO, args.dataset, args.fid_samples)
    prompts = [sample["caption"] for sample in reference]
    with tempfile.TemporaryDirectory() as scratch:
        variants = {"torch": open_pipeline(folder, "torch"),
                    "onnxruntime fp32": OnnxPipeline(folder, threads=args.threads),
                    "onnxruntime int8 generator": OnnxPipeline(quantized_copy(folder, Path(scratch) / "int8"),
                                                               threads=args.threads),
                    "onnxruntime int8 generator + decoder": OnnxPipeline(
                        quantized_copy(folder, Path(scratch) / "int8_both", ("generator.onnx", "decoder.onnx")),
                        threads=args.threads)}
        timings = speed(variants, prompts, args.pairs)
        images = {name: np.concatenate(list(p.generate_batches(prompts, batch_size=16, unit=True)))
                  for name, p in variants.items()}
    metrics = GenerationMetrics(torch.stack([image_to_tensor(s["image"]) for s in reference]),
                                kid_subset_size=min(100, len(reference)))
    rows, figures = [], {}
    for name, batches in timings.items():
        gap = float(np.abs(images[name] - images["torch"]).max())
        fid = metrics.score(torch.from_numpy(images[name]) * 2 - 1)["fid"]
        figures[name] = {"batches": batches, "parity_max_abs_diff": gap, "fid": fid}
        rows.append([name, *(f"{fmt(batches[b]['ms_per_image'], '.1f')} ({fmt(batches[b]['speedup'], '.2f')}x)"
                             for b in BATCHES), fmt(gap, '.1e'), fmt(fid, '.1f')])
    print(markdown_table(["variant", *(f"ms/image, batch {b} (vs torch)" for b in BATCHES),
                          "max |diff| vs torch", f"FID ({len(prompts)})"], rows))
    write_json(WORK / "onnx_speed" / f"{args.dataset}.json", {"folder": str(folder), "threads": args.threads,
                                                              "pairs": args.pairs, "variants": figures})


if __name__ == "__main__":
    main()
