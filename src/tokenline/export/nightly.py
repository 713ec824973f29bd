"""The nightly re-evaluation of what is in production: each dataset's `production` model, today's eval data, a fixed seed.

A night's report is `data/reports/nightly/<date>/<dataset>.json` (with a contact sheet beside it).
Reports are kept, never overwritten: a second run for the same date returns the first report. Each
report compares its figures with the newest earlier night's and sets `regressed` when one is worse
by more than `nightly.max_regression` (a fraction): FID and KID up, shapes accuracies down.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tokenline.artifacts import atomic_write_bytes, atomic_write_json, read_manifest, verify_output
from tokenline.config import Params
from tokenline.contact_sheet import contact_sheet, png_bytes
from tokenline.eval.compositional import ACCURACIES
from tokenline.eval.generation import GenerationMetrics
from tokenline.eval.stages import reference_samples, shapes_accuracy
from tokenline.export.generation import open_pipeline, resolve_model
from tokenline.export.registry import PRODUCTION, model_name
from tokenline.layout import output_path
from tokenline.tokenizer.pixels import samples_to_batch, tensor_to_image

NIGHTLY = Path("data") / "reports" / "nightly"
LOWER_IS_BETTER = ("fid", "kid")
HIGHER_IS_BETTER = ACCURACIES
BATCH = 16
DAY_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class NightlyInputError(RuntimeError):
    """The eval data a nightly run reads is missing: its stage has not run for that dataset."""


def nightly_report_path(root: Path, day: str, dataset: str) -> Path:
    """Where one night's report of one dataset lives."""
    return Path(root) / NIGHTLY / day / f"{dataset}.json"


def previous_report(root: Path, day: str, dataset: str) -> dict[str, Any] | None:
    """The newest report of `dataset` from a night before `day`, or None (ISO dates sort as text)."""
    nights = sorted((p.parent.name for p in (Path(root) / NIGHTLY).glob(f"*/{dataset}.json") if p.parent.name < day),
                    reverse=True)
    return json.loads(nightly_report_path(root, nights[0], dataset).read_text()) if nights else None


def regressions(today: dict[str, float], before: dict[str, float], max_regression: float) -> list[str]:
    """Each watched figure worse than `before` by more than the fraction `max_regression`, as a sentence."""
    found = []
    for name in (*LOWER_IS_BETTER, *HIGHER_IS_BETTER):
        if today.get(name) is None or before.get(name) is None:
            continue
        old, new = float(before[name]), float(today[name])
        change = (new - old) / abs(old) if old else (0.0 if new == old else float("inf"))
        worse = change if name in LOWER_IS_BETTER else -change
        if worse > max_regression:
            found.append(f"{name} {old:.4g} -> {new:.4g} ({change:+.1%}, limit {max_regression:.0%})")
    return found


def eval_inputs(root: Path, dataset: str) -> tuple[Path, Path]:
    """The dataset's current shards and captions, verified against their manifests."""
    folders = []
    for output in ("shards", "captions"):  # each made by the stage of the same name
        folder = output_path(root, dataset, output)
        manifest = read_manifest(folder)
        if manifest is None:
            raise NightlyInputError(f"nightly eval of {dataset} needs {folder}: run `tokenline run {output} --dataset {dataset}` first")
        verify_output(folder, manifest)
        folders.append(folder)
    return folders[0], folders[1]


def production_version(dataset: str, tracking_uri: str) -> int:
    """The registry version `production` names for the dataset (the download checks the alias exists first)."""
    from mlflow import MlflowClient

    return int(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
               .get_model_version_by_alias(model_name(dataset), PRODUCTION).version)


def evaluate_production(dataset: str, params: Params, root: Path, tracking_uri: str, day: str | None = None,
                        progress: bool = False) -> dict[str, Any]:
    """Re-evaluate `models:/tokenline-<dataset>@production` on today's eval data; write and return the night's report."""
    root = Path(root)
    day = day or time.strftime("%Y-%m-%d")
    path = nightly_report_path(root, day, dataset)
    if path.exists():  # kept, never overwritten: the first evaluation of a night stands
        return json.loads(path.read_text()) | {"kept": True}
    p = params.nightly
    shards, captions = eval_inputs(root, dataset)
    folder = resolve_model(f"models:/{model_name(dataset)}@{PRODUCTION}", tracking_uri)
    version = production_version(dataset, tracking_uri)
    pipeline = open_pipeline(folder)
    samples = reference_samples(shards, captions, p.samples)
    if len(samples) < 2:
        raise NightlyInputError(f"nightly eval of {dataset} needs at least 2 real images in {shards}, found {len(samples)}")
    prompts = [sample["caption"] for sample in samples]
    real = samples_to_batch(samples, pipeline.image_size)
    started = time.perf_counter()
    batches = pipeline.generate_batches(prompts, BATCH, unit=True, seed=p.seed)
    rendered = np.concatenate(list(tqdm(batches, total=-(-len(prompts) // BATCH), desc=f"nightly {dataset}",
                                        unit="batch", disable=not progress)))
    ms_per_image = 1000 * (time.perf_counter() - started) / len(prompts)
    images = torch.from_numpy(rendered) * 2 - 1  # the metrics take [-1, 1]
    figures = GenerationMetrics(real, kid_subset_size=p.kid_subset_size, seed=p.seed).score(images)
    if params.dataset(dataset).source == "shapes":
        figures |= {key: value for key, value in shapes_accuracy(images, prompts).items() if key in HIGHER_IS_BETTER}
    figures["ms_per_image"] = ms_per_image
    before = previous_report(root, day, dataset)
    found = regressions(figures, before["figures"], p.max_regression) if before else []
    report = {
        "day": day, "dataset": dataset, "model": f"models:/{model_name(dataset)}@{PRODUCTION}", "version": version,
        "pipeline_sha256": pipeline.spec.get("files", {}),
        "eval_data": {"shards": read_manifest(shards)["content_hash"], "captions": read_manifest(captions)["content_hash"]},
        "samples": len(samples), "seed": p.seed, "figures": figures,
        "previous": {"day": before["day"], "version": before["version"], "figures": before["figures"]} if before else None,
        "max_regression": p.max_regression, "regressions": found, "regressed": bool(found),
    }
    sheet = contact_sheet([tensor_to_image(image) for image in images[:16]], cell=96, captions=prompts[:16])
    atomic_write_bytes(path.with_suffix(".png"), png_bytes(sheet))
    atomic_write_json(path, report)  # the report last: a report never names a sheet that is not there
    return report


def nightly_line(report: dict[str, Any]) -> str:
    """One line of a night's report: dataset, version, figures, and the verdict against the previous night."""
    shown = "  ".join(f"{name} {report['figures'][name]:.4g}" for name in (*LOWER_IS_BETTER, *HIGHER_IS_BETTER)
                      if report["figures"].get(name) is not None)
    before = report["previous"]
    verdict = ("REGRESSED: " + "; ".join(report["regressions"])) if report["regressed"] else \
        (f"ok against {before['day']} (v{before['version']})" if before else "first night on record")
    kept = " (kept from an earlier run)" if report.get("kept") else ""
    return f"{report['dataset']:<10} {report['day']} v{report['version']}  {shown}  {verdict}{kept}"
