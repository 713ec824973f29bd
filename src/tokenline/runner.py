"""Run registered stages: freshness checks, atomic outputs, manifests last, reports, MLflow."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tokenline.artifacts import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    git_commit,
    read_manifest,
    verify_output,
    write_manifest,
)
from tokenline.config import ConfigError, Params
from tokenline.contact_sheet import contact_sheet, png_bytes
from tokenline.dagster_events import report_runless
from tokenline.dvc_lock import record_in_dvc_lock
from tokenline.distill.teacher import check_student_params
from tokenline.generator.spec import check_generator_params
from tokenline.layout import (
    html_relpath,
    output_path,
    plot_relpath,
    report_path,
    samples_path,
    work_path,
)
from tokenline.locks import hold_locks, sweep_leftovers, sweep_work_folder
from tokenline.pipeline import PRODUCER, params_keys, stage_closure, upstream_stages
from tokenline.stage import INIT, Stage, StageContext, StageResult
from tokenline.tokenizer.spec import check_two_stage_params, tokenizer_config_values
from tokenline.tracking import start_tracker

log = logging.getLogger(__name__)


def check_params(params: Params) -> None:
    """The checks of params that need the areas' knowledge (sizes, patches and widths that fit), as ConfigError naming the section.

    config.py validates each key; whether a tokenizer or generator can be built from them is
    known to those areas, which sit above config, so the runner asks them before any work.
    """
    try:
        tokenizer_config_values(params, text_dim=0, check=True)
        check_two_stage_params(params)
        check_generator_params(params)
        check_student_params(params)
    except ValueError as error:
        raise ConfigError(f"invalid params: {error}") from None


class MissingInputError(RuntimeError):
    """A stage's input has no manifest: its producer has not run (or did not finish)."""


@dataclass
class StageRun:
    """The outcome of one stage on one dataset."""

    stage: str
    dataset: str | None  # None for a project-scope stage
    skipped: bool
    manifests: dict[str, dict]
    result: StageResult | None = None
    mlflow_run_id: str | None = None  # the MLflow run of a stage that ran with tracking on


def _params_hash(stage: Stage, params: Params, dataset: str | None) -> str:
    return params.slice_hash(params_keys(stage), dataset)


def input_folders(stage: Stage, params: Params, dataset: str | None, root: Path) -> dict[str, Path]:
    """The committed folders a stage reads, by key: the output name, or `<dataset>/<output>` for a project stage."""
    if stage.per_dataset:
        folders = {name: output_path(root, dataset, name) for name in stage.inputs}
        init = getattr(params, stage.init_from).init if stage.init_from else None
        if init:
            folders[INIT] = Path(root) / Path(init).expanduser()  # an absolute path stays as it is
        return folders
    return {f"{name}/{output}": output_path(root, name, output) for name in params.active_datasets for output in stage.inputs}


def _input_hashes(stage: Stage, params: Params, dataset: str | None, root: Path) -> dict[str, str]:
    """Each input folder's content hash, once its files are verified against its manifest (DamagedOutputError)."""
    hashes = {}
    for key, folder in input_folders(stage, params, dataset, root).items():
        manifest = read_manifest(folder)
        if manifest is None and key == INIT:
            raise MissingInputError(
                f"{stage.init_from}.init names {folder}, which is no {stage.name} stage output (no manifest.json); "
                f"point it at models/<dataset>/{stage.name} of a project"
            )
        if manifest is None:
            source = dataset or key.split("/")[0]
            producer = PRODUCER[key.split("/")[-1]]
            raise MissingInputError(
                f"stage {stage.name!r} needs {folder}, which has no manifest: run "
                f"`tokenline run {producer.name} --dataset {source}` first"
            )
        verify_output(folder, manifest)
        hashes[key] = manifest["content_hash"]
    return hashes


def report_files(stage: Stage, dataset: str | None, root: Path) -> list[Path]:
    """The report files a stage writes beside its outputs: metrics JSON, plot series, HTML."""
    root = Path(root)
    files = [report_path(root, dataset, stage.name)] if stage.report else []
    files += [root / plot_relpath(dataset, stage.name, plot.name) for plot in stage.plots]
    if stage.html:
        files.append(root / html_relpath(dataset, stage.name))
    return files


def staleness(stage: Stage, params: Params, dataset: str | None, root: Path, verify: bool = True) -> str | None:
    """Why `stage` must run for `dataset` (a reason), or None when its outputs are fresh (dataset None: project).

    Outputs and inputs whose files differ from their manifests raise DamagedOutputError, naming
    the file and the stage to rebuild, unless `verify` is off for the outputs (a forced rebuild).
    """
    folders = [output_path(root, dataset, name) for name in stage.outputs]
    manifests = [read_manifest(folder) for folder in folders]
    if any(manifest is None for manifest in manifests):
        return "outputs missing"
    if verify:
        for folder, manifest in zip(folders, manifests):
            verify_output(folder, manifest)
    if not all(file.exists() for file in report_files(stage, dataset, root)):
        return "report missing"
    if any(m["params_hash"] != _params_hash(stage, params, dataset) for m in manifests):
        return "params changed"
    try:
        current = _input_hashes(stage, params, dataset, root)
    except MissingInputError:
        return "inputs missing"
    if any({k: v["hash"] for k, v in m["inputs"].items()} != current for m in manifests):
        return "inputs changed"
    return None


def _write_reports(stage: Stage, result: StageResult, params: Params, dataset: str | None, root: Path) -> list[tuple[Path, str]]:
    """Write the report JSON, plot series, HTML and contact sheet; returns (file, MLflow artifact folder) pairs."""
    written = []
    if stage.report:
        atomic_write_json(report_path(root, dataset, stage.name), result.report or {})
    for plot in stage.plots:
        path = root / plot_relpath(dataset, stage.name, plot.name)
        atomic_write_json(path, result.plots.get(plot.name, []))
        written.append((path, "plots"))
    if stage.html:
        path = root / html_relpath(dataset, stage.name)
        atomic_write_bytes(path, (result.html or "").encode())
        written.append((path, "reports"))
    if result.samples:
        shown = result.samples[: params.tracking.contact_sheet]
        path = samples_path(root, dataset, stage.name)
        sheet = contact_sheet([image for image, _ in shown], cell=96, captions=[str(caption) for _, caption in shown])
        atomic_write_bytes(path, png_bytes(sheet))
        written.append((path, "samples"))
    return written


def _locked_folders(stage: Stage, dataset: str | None, root: Path) -> list[Path]:
    """The folders a stage run writes: its outputs and, for a stage that trains, its `.work` folder."""
    folders = [output_path(root, dataset, name) for name in stage.outputs]
    if dataset is not None and stage.models:
        folders.append(work_path(root, dataset, stage.name))
    return folders


def run_one(
    stage: Stage, params: Params, dataset: str | None, root: Path, resume: bool = False, force: bool = False,
    tell_dagster: bool = True,
) -> StageRun:
    """Run one stage on one dataset (dataset None: a project-scope stage over every active dataset) now.

    `resume` lets a training stage continue its last state folder (refused on a changed
    training config unless `force`). The run holds the lock of every folder it writes from
    start to end (OutputLockedError when another run has one), sweeps what killed runs left
    there, and marks its MLflow run FAILED on any failure.

    A built stage is recorded for the other drivers: in dvc.lock (when DVC would have built it the
    same way) and, with tracking on and `tell_dagster` (off inside Dagster, which records its own
    runs), as a runless materialization in the project's Dagster home.
    """

    root = Path(root)
    if stage.per_dataset != (dataset is not None):
        raise ValueError(f"stage {stage.name!r} has scope {stage.scope!r}: "
                         f"{'name a dataset' if stage.per_dataset else 'it takes no dataset'}")
    if dataset is not None:
        params.dataset(dataset)  # fails early, naming the dataset, if it is unknown
    locked = _locked_folders(stage, dataset, root)
    with hold_locks(locked):
        for folder in locked:
            sweep_leftovers(folder)
        if dataset is not None:
            sweep_work_folder(work_path(root, dataset, stage.name))
        input_hashes = _input_hashes(stage, params, dataset, root)
        log.info("running %s on %s (profile %s)", stage.name, dataset or "every active dataset", params.profile)
        tracker = start_tracker(stage, params, dataset, root)
        try:
            outcome = _run_tracked(stage, params, dataset, root, resume, force, input_hashes, tracker)
        except BaseException:
            tracker.fail()
            raise
        record_in_dvc_lock(stage, params, dataset, root)
    if tell_dagster and params.tracking.enabled:
        report_runless(stage, params, dataset, root, outcome.manifests, outcome.mlflow_run_id)
    return outcome


def _run_tracked(stage: Stage, params: Params, dataset: str | None, root: Path, resume: bool, force: bool,
                 input_hashes: dict[str, str], tracker) -> StageRun:
    """Run the stage function into temporary folders, commit them with their manifests, write the reports."""
    folders = input_folders(stage, params, dataset, root)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        temps = {
            name: stack.enter_context(atomic_dir(output_path(root, dataset, name)))
            for name in stage.outputs
        }
        # A project stage's folders are keyed "<dataset>/<output>": regroup them by dataset.
        per_dataset: dict[str, dict[str, Path]] = {}
        if dataset is None:
            for key, folder in folders.items():
                name, output = key.split("/", 1)
                per_dataset.setdefault(name, {})[output] = folder
        inputs = folders if dataset is not None else {}
        context = StageContext(stage, params, dataset, root, inputs, temps, tracker, resume, force, per_dataset)
        result = stage.func(context)
        wall_time = time.perf_counter() - started
        if dataset is None:
            spec = {name: params.dataset(name).model_dump(mode="json") for name in params.active_datasets}
        else:
            spec = params.dataset(dataset).model_dump(mode="json")
        manifests = {}
        for name, temp in temps.items():
            manifests[name] = write_manifest(
                temp,
                stage=stage.name,
                output=name,
                dataset=dataset,
                profile=params.profile,
                inputs={
                    key: {"path": os.path.relpath(folders[key], root), "hash": value}
                    for key, value in input_hashes.items()
                },
                params={key: params.section(key) for key in stage.params},
                dataset_spec=spec,
                params_hash=_params_hash(stage, params, dataset),
                git_commit=git_commit(root),
                counts=result.counts,
                metrics=result.metrics,
                wall_time_s=round(wall_time, 3),
            )
    # Reports and previews are written after the outputs are committed: a report never
    # describes an output that is not there.
    written = _write_reports(stage, result, params, dataset, root)
    run_id = tracker.finish(result, manifests, written)
    log.info("%s on %s done in %.1fs: %s", stage.name, dataset or "every active dataset", wall_time, result.counts)
    return StageRun(stage.name, dataset, skipped=False, manifests=manifests, result=result, mlflow_run_id=run_id)


def _run_if_stale(step: Stage, params: Params, dataset: str | None, root: Path, force: bool, resume: bool,
                  tell_dagster: bool = True) -> StageRun:
    """Run `step` when it is stale or forced; otherwise record it as skipped."""
    where = dataset or "every active dataset"
    # A forced step is being rebuilt: its own damaged outputs are what the user asked to replace.
    reason = staleness(step, params, dataset, root, verify=not force)
    if reason is None and not force:
        log.debug("%s on %s is fresh; skipping", step.name, where)  # the CLI's summary table lists it
        manifests = {name: read_manifest(output_path(root, dataset, name)) for name in step.outputs}
        return StageRun(step.name, dataset, skipped=True, manifests=manifests)
    if reason:
        log.info("%s on %s: %s", step.name, where, reason)
    return run_one(step, params, dataset, root, resume=resume, force=force, tell_dagster=tell_dagster)


def run_with_upstream(
    stage: Stage, params: Params, dataset: str, root: Path, upstream: bool = True, force: bool = False,
    resume: bool = False, tell_dagster: bool = True,
) -> list[StageRun]:
    """Run `stage` after every upstream stage whose outputs are missing or stale.

    The named stage always runs unless it is fresh and `force` is off; `upstream=False`
    runs only the named stage (DVC's way: DVC itself decides what is stale). `resume`
    applies to the named stage only. `tell_dagster` off: Dagster is the driver (see run_one).
    """
    if not stage.per_dataset:
        raise ValueError(f"stage {stage.name!r} covers every dataset: run it with run_project")
    check_params(params)
    chain = stage_closure(stage) if upstream else [stage]
    return [_run_if_stale(step, params, dataset, root, force and step is stage, resume and step is stage, tell_dagster)
            for step in chain]


def run_project(stage: Stage, params: Params, root: Path, upstream: bool = True, force: bool = False,
                tell_dagster: bool = True) -> list[StageRun]:
    """Run a project-scope stage once over every active dataset, after each dataset's stale upstream stages."""
    check_params(params)
    runs = []
    if upstream:
        for name in params.active_datasets:
            for parent in upstream_stages(stage):
                runs.extend(run_with_upstream(parent, params, name, root, tell_dagster=tell_dagster))
    return [*runs, _run_if_stale(stage, params, None, root, force, resume=False, tell_dagster=tell_dagster)]
