"""Run registered stages: freshness checks, atomic outputs, manifests last, reports, MLflow."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tokenline.artifacts import atomic_dir, atomic_write_bytes, atomic_write_json, git_commit, read_manifest, write_manifest
from tokenline.config import Params
from tokenline.contact_sheet import contact_sheet, png_bytes
from tokenline.pipeline import (
    PRODUCER,
    Stage,
    StageContext,
    StageResult,
    output_path,
    params_keys,
    report_path,
    samples_path,
    stage_closure,
)

log = logging.getLogger(__name__)


class MissingInputError(RuntimeError):
    """A stage's input has no manifest: its producer has not run (or did not finish)."""


@dataclass
class StageRun:
    """The outcome of one stage on one dataset."""

    stage: str
    dataset: str
    skipped: bool
    manifests: dict[str, dict]
    result: StageResult | None = None


def _params_hash(stage: Stage, params: Params, dataset: str) -> str:
    return params.slice_hash(params_keys(stage), dataset)


def _input_hashes(stage: Stage, root: Path, dataset: str) -> dict[str, str]:
    hashes = {}
    for name in stage.inputs:
        manifest = read_manifest(output_path(root, dataset, name))
        if manifest is None:
            raise MissingInputError(
                f"stage {stage.name!r} needs {output_path(root, dataset, name)}, which has no "
                f"manifest: run `tokenline run {PRODUCER[name].name} --dataset {dataset}` first"
            )
        hashes[name] = manifest["content_hash"]
    return hashes


def staleness(stage: Stage, params: Params, dataset: str, root: Path) -> str | None:
    """Why `stage` must run for `dataset` (a reason), or None when its outputs are fresh."""
    manifests = [read_manifest(output_path(root, dataset, name)) for name in stage.outputs]
    if any(manifest is None for manifest in manifests):
        return "outputs missing"
    if stage.report and not report_path(root, dataset, stage.name).exists():
        return "report missing"
    if any(m["params_hash"] != _params_hash(stage, params, dataset) for m in manifests):
        return "params changed"
    try:
        current = _input_hashes(stage, root, dataset)
    except MissingInputError:
        return "inputs missing"
    if any({k: v["hash"] for k, v in m["inputs"].items()} != current for m in manifests):
        return "inputs changed"
    return None


def run_one(stage: Stage, params: Params, dataset: str, root: Path, resume: bool = False, force: bool = False) -> StageRun:
    """Run one stage on one dataset now, whatever its freshness.

    `resume` lets a training stage continue its last state folder (refused on a changed
    training config unless `force`).
    """
    from tokenline.tracking import start_tracker

    root = Path(root)
    params.dataset(dataset)  # fails early, naming the dataset, if it is unknown
    input_hashes = _input_hashes(stage, root, dataset)
    inputs = {name: output_path(root, dataset, name) for name in stage.inputs}
    started = time.perf_counter()
    log.info("running %s on %s (profile %s)", stage.name, dataset, params.profile)
    tracker = start_tracker(stage, params, dataset, root)
    with contextlib.ExitStack() as stack:
        temps = {
            name: stack.enter_context(atomic_dir(output_path(root, dataset, name)))
            for name in stage.outputs
        }
        context = StageContext(stage, params, dataset, root, inputs, temps, tracker, resume, force)
        try:
            result = stage.func(context)
        except BaseException:
            tracker.fail()
            raise
        wall_time = time.perf_counter() - started
        manifests = {}
        for name, temp in temps.items():
            manifests[name] = write_manifest(
                temp,
                stage=stage.name,
                output=name,
                dataset=dataset,
                profile=params.profile,
                inputs={
                    key: {"path": str(inputs[key].relative_to(root)), "hash": value}
                    for key, value in input_hashes.items()
                },
                params={key: params.section(key) for key in stage.params},
                dataset_spec=params.dataset(dataset).model_dump(mode="json"),
                params_hash=_params_hash(stage, params, dataset),
                git_commit=git_commit(root),
                counts=result.counts,
                metrics=result.metrics,
                wall_time_s=round(wall_time, 3),
            )
    # Reports and previews are written after the outputs are committed: a report never
    # describes an output that is not there.
    if stage.report:
        atomic_write_json(report_path(root, dataset, stage.name), result.report or {})
    sheet_file = None
    if result.samples:
        images = [image for image, _ in result.samples[: params.tracking.contact_sheet]]
        sheet_file = samples_path(root, dataset, stage.name)
        atomic_write_bytes(sheet_file, png_bytes(contact_sheet(images)))
    tracker.finish(result, manifests, sheet_file)
    log.info("%s on %s done in %.1fs: %s", stage.name, dataset, wall_time, result.counts)
    return StageRun(stage.name, dataset, skipped=False, manifests=manifests, result=result)


def run_with_upstream(
    stage: Stage, params: Params, dataset: str, root: Path, upstream: bool = True, force: bool = False,
    resume: bool = False,
) -> list[StageRun]:
    """Run `stage` after every upstream stage whose outputs are missing or stale.

    The named stage always runs unless it is fresh and `force` is off; `upstream=False`
    runs only the named stage (DVC's way: DVC itself decides what is stale). `resume`
    applies to the named stage only.
    """
    runs = []
    chain = stage_closure(stage) if upstream else [stage]
    for step in chain:
        reason = staleness(step, params, dataset, root)
        if reason is None and not (force and step is stage):
            log.info("%s on %s is fresh; skipping", step.name, dataset)
            manifests = {name: read_manifest(output_path(root, dataset, name)) for name in step.outputs}
            runs.append(StageRun(step.name, dataset, skipped=True, manifests=manifests))
            continue
        if reason:
            log.info("%s on %s: %s", step.name, dataset, reason)
        named = step is stage
        runs.append(run_one(step, params, dataset, root, resume=resume and named, force=force and named))
    return runs
