"""Train each quantizer through the real pipeline and print PSNR, SSIM, rFID and training time.

Every variant is `tokenline run recon_eval` on the same data (default: the cpu profile, OpenMoji
64 px, K = 32) with `--set` overrides, so the figures are what a user of the pipeline gets.
Text conditioning is measured as an extra `vq + text` row at the same K.

Usage: .venv/bin/python -m benchmarks tokenizer_quantizers [--root DIR] [--steps N]
       [--variants vq,softvq,binary,kl,vq+text] [--profile cpu] [--dataset openmoji]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from tokenline.artifacts import read_manifest
from tokenline.params_loading import load_params
from tokenline.layout import output_path, report_path
from tokenline.pipeline import get_stage
from tokenline.runner import run_with_upstream

REPO = Path(__file__).resolve().parents[1]


def run_variant(root: Path, profile: str, dataset: str, quantizer: str, text: bool, steps: int | None) -> dict:
    """Train one tokenizer variant and evaluate it; returns the row to print."""
    overrides = ["tracking.enabled=false", f"tokenizer.quantizer={quantizer}", f"tokenizer.text_conditioning={str(text).lower()}"]
    if steps:
        overrides.append(f"tokenizer.train.steps={steps}")
    params = load_params(root / "params.yaml", profile=profile, overrides=overrides, dataset=dataset)
    started = time.perf_counter()
    run_with_upstream(get_stage("recon_eval"), params, dataset, root)
    wall = time.perf_counter() - started
    training = read_manifest(output_path(root, dataset, "tokenizer"))
    report = json.loads(report_path(root, dataset, "recon_eval").read_text())
    return {
        "variant": quantizer + (" + text" if text else ""),
        "steps": training["counts"]["steps"],
        "train_s": training["wall_time_s"],
        "psnr": report["psnr"],
        "ssim": report["ssim"],
        "rfid": report["rfid"],
        "bits": report["bits_per_image"],
        "code_usage": report["code_usage"],
        "samples": report["samples"],
        "total_s": wall,
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    """Run the variants and print one table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO / "benchmarks" / ".work" / "quantizers")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--dataset", default="openmoji")
    parser.add_argument("--steps", type=int, default=None, help="tokenizer.train.steps (default: the profile's)")
    parser.add_argument("--variants", default="vq,softvq,binary,kl,vq+text")
    args = parser.parse_args()

    args.root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", args.root / "params.yaml")
    rows = []
    for variant in args.variants.split(","):
        quantizer, _, text = variant.partition("+")
        rows.append(run_variant(args.root, args.profile, args.dataset, quantizer, bool(text), args.steps))
        print(json.dumps(rows[-1]), flush=True)
    params = load_params(args.root / "params.yaml", profile=args.profile, dataset=args.dataset)
    t = params.tokenizer
    print(f"\n{args.dataset} at {params.data.resolution} px, K = {t.num_tokens}, size {t.size} {t.model}, "
          f"batch {t.train.batch_size}; rFID on {rows[0]['samples']} val images")
    print(f"{'variant':<12} {'steps':>6} {'train s':>8} {'PSNR':>7} {'SSIM':>6} {'rFID':>7} {'bits':>6} {'usage':>6}")
    for r in rows:
        print(f"{r['variant']:<12} {r['steps']:>6} {r['train_s']:>8.0f} {r['psnr']:>7.2f} {r['ssim']:>6.3f} "
              f"{_fmt(r['rfid'], '7.1f')} {_fmt(r['bits'], '6.0f')} {_fmt(r['code_usage'], '6.3f')}")


if __name__ == "__main__":
    main()
