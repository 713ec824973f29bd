"""Two-stage (proxy) training of the 1D tokenizer against its grid teacher, vs pixel training at equal steps.

Every variant is `tokenline run recon_eval` in one scratch root (default: the cpu profile,
OpenMoji 64 px) with `--set` overrides, so the figures are what a user of the pipeline gets.
The grid teacher (stage `teacher_tokenizer`) is trained once and shared; its own PSNR, SSIM and
rFID are measured with recon_eval's function on the same val images. Variants:

* `pixels`:    tokenizer.train.proxy_steps=0, the 1D tokenizer learns from pixels for N steps;
* `two-stage`: the first P steps learn the teacher's latents (stage 1), the remaining N - P steps
               fine-tune the decoder on pixels with the encoder frozen (stage 2).

N is the profile's tokenizer.train.steps unless `--steps`; P is `--proxy-share` of N (0.5: half
and half, fixed beforehand, not searched on these figures). `--quantizers` and `--tokens` add
two-stage rows for other quantizers and token counts. The train time of each row is the
tokenizer's own (training.json); the teacher's is printed once beside it.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks two_stage [--root DIR] [--steps N]
       [--proxy-share 0.5] [--quantizers kl] [--tokens 32] [--pixels-baseline kl]
       [--profile cpu] [--dataset openmoji] [--threads 1] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

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
from tokenline.artifacts import read_manifest
from tokenline.layout import output_path, report_path


def teacher_row(root: Path, dataset: str) -> dict:
    """The grid teacher's reconstruction figures on the val split (recon_eval's function and protocol)."""
    from tokenline.eval.reconstruction import evaluate_reconstruction
    from tokenline.tokenizer.model import Tokenizer1D

    folder = output_path(root, dataset, "teacher_tokenizer")
    teacher = Tokenizer1D.from_checkpoint(folder)
    metrics, _ = evaluate_reconstruction(teacher, output_path(root, dataset, "shards"), split="val", grid=0)
    training = training_summary(root, dataset, "teacher_tokenizer")
    return {"variant": f"grid teacher ({teacher.config.grid}x{teacher.config.grid}, {teacher.config.quantizer})",
            "tokens": teacher.config.num_tokens, "steps": training["steps"], "train_s": training["wall_time_s"],
            **{key: metrics.get(key) for key in ("psnr", "ssim", "rfid", "samples")}, "floats": metrics.get("latent_floats_per_image")}


def variant_row(root: Path, args, name: str, overrides: list[str]) -> dict:
    """Train and evaluate one tokenizer variant; returns its figures (and keeps its reconstruction grid)."""
    params = bench_params(root, args.profile, args.dataset, [*args.overrides, *overrides])
    run_stages(root, params, args.dataset, ["recon_eval"])
    report = json.loads(report_path(root, args.dataset, "recon_eval").read_text())
    training = training_summary(root, args.dataset, "tokenizer")
    grid = output_path(root, args.dataset, "recon_eval") / "reconstructions.png"
    if grid.is_file():
        shutil.copy2(grid, root / f"reconstructions_{name.replace(' ', '_')}.png")
    return {"variant": name, "tokens": params.tokenizer.num_tokens, "steps": training["steps"],
            "proxy_steps": params.tokenizer.train.proxy_steps, "train_s": training["wall_time_s"],
            "psnr": report["psnr"], "ssim": report["ssim"], "rfid": report["rfid"], "samples": report["samples"],
            "bits": report.get("bits_per_image"), "floats": report.get("latent_floats_per_image"),
            "tokenizer_hash": read_manifest(output_path(root, args.dataset, "tokenizer"))["content_hash"]}


def main() -> None:
    """Train the teacher, then each variant; print one table and write results.json in the root."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, WORK / "two_stage", "openmoji")
    parser.add_argument("--steps", type=int, default=None, help="tokenizer.train.steps N (default: the profile's)")
    parser.add_argument("--proxy-share", type=float, default=0.5, help="P / N, the share of stage 1 (default 0.5)")
    parser.add_argument("--quantizers", default="kl", help="comma-separated quantizers trained two-stage at --tokens")
    parser.add_argument("--tokens", default="32", help="comma-separated K trained two-stage with the first quantizer")
    parser.add_argument("--pixels-baseline", default="kl", help="comma-separated quantizers also trained on pixels only")
    args = parser.parse_args()
    setup_threads(args.threads)
    prepare_root(args.root, seed_sources(args), args.dataset, ["captions"])

    steps = args.steps or bench_params(args.root, args.profile, args.dataset, args.overrides).tokenizer.train.steps
    proxy = round(args.proxy_share * steps)
    run_stages(args.root, bench_params(args.root, args.profile, args.dataset, args.overrides), args.dataset,
               ["teacher_tokenizer"])
    rows = [teacher_row(args.root, args.dataset)]
    print(json.dumps(rows[-1]), flush=True)
    quantizers, token_counts = args.quantizers.split(","), [int(k) for k in args.tokens.split(",")]
    plans = [(f"{q} K={token_counts[0]} pixels", [f"tokenizer.quantizer={q}", f"tokenizer.num_tokens={token_counts[0]}",
                                                  "tokenizer.train.proxy_steps=0"])
             for q in args.pixels_baseline.split(",") if q]
    plans += [(f"{q} K={k} two-stage", [f"tokenizer.quantizer={q}", f"tokenizer.num_tokens={k}",
                                        f"tokenizer.train.proxy_steps={proxy}"])
              for q in quantizers for k in (token_counts if q == quantizers[0] else token_counts[:1])]
    for name, overrides in plans:
        rows.append(variant_row(args.root, args, name, [f"tokenizer.train.steps={steps}", *overrides]))
        print(json.dumps(rows[-1]), flush=True)

    write_json(args.root / "results.json", {"steps": steps, "proxy_steps": proxy, "rows": rows})
    print(f"\n{args.dataset}, profile {args.profile}, N = {steps} steps (two-stage: {proxy} proxy + {steps - proxy} "
          f"pixels); rFID on {rows[-1]['samples']} val images; train s on {args.threads} thread(s)")
    print(markdown_table(
        ["variant", "tokens", "steps", "train s", "PSNR", "SSIM", "rFID", "bits / floats per image"],
        [[r["variant"], str(r["tokens"]), str(r["steps"]), fmt(r["train_s"], ".0f"), fmt(r["psnr"], ".2f"),
          fmt(r["ssim"], ".3f"), fmt(r["rfid"], ".1f"), fmt(r.get("bits") or r.get("floats"), ".0f")] for r in rows]))


if __name__ == "__main__":
    main()
