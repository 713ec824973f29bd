"""Record what `tokenline run` (or Dagster) built in dvc.lock, so `dvc status` and `dvc repro` see it as built.

DVC only trusts dvc.lock: outputs another driver wrote look unbuilt to it, and `dvc repro` would
train them again. After a stage commits its outputs, the runner runs `dvc commit --force` of that
stage (`<stage>@<dataset>` for a matrix stage): DVC hashes the stage's deps, params and outs as
they are now, stores the outs in its cache (so `dvc push` has them) and writes the lock entry.

The lock entry claims "this command, with params.yaml as it is, made these outputs". That is only
true when the run used exactly the params DVC's command would load, so a run with `--profile`
or `--set` values that change the stage's params slice is not recorded (and says so).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from tokenline.config import ConfigError, Params
from tokenline.dvc_yaml import active_datasets
from tokenline.params_loading import load_params
from tokenline.pipeline import params_keys
from tokenline.stage import Stage

log = logging.getLogger(__name__)

# Set by `dvc repro` for the commands it runs: DVC writes that stage's lock entry itself.
DVC_RUNNING = "DVC_STAGE"
PARAMS_DIFFER = "this run's params differ"


def dvc_stage_name(stage: Stage, dataset: str | None) -> str:
    """The stage's name in dvc.yaml: `<stage>@<dataset>` for a matrix (per-dataset) stage."""
    return f"{stage.name}@{dataset}" if dataset is not None else stage.name


def lock_skip_reason(stage: Stage, params: Params, dataset: str | None, root: Path) -> str | None:
    """Why this run must not be written to dvc.lock, or None when DVC would have run it the same way."""
    root = Path(root)
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        return "not a DVC project"
    if os.environ.get(DVC_RUNNING):
        return "dvc repro runs it and writes the lock itself"
    params_file = root / "params.yaml"
    if not params_file.is_file():
        return "no params.yaml"
    if dataset is not None and dataset not in active_datasets(params_file):
        return f"dataset {dataset!r} is not in params.yaml's active_datasets (dvc.yaml has no such stage)"
    try:
        as_dvc_runs_it = load_params(params_file, dataset=dataset)
    except ConfigError as error:
        return f"params.yaml does not load: {error}"
    keys = params_keys(stage)
    if as_dvc_runs_it.slice_hash(keys, dataset) != params.slice_hash(keys, dataset):
        return (f"{PARAMS_DIFFER} (profile {params.profile!r} or --set values) from what "
                f"`dvc repro` would use (profile {as_dvc_runs_it.profile!r})")
    return None


def record_in_dvc_lock(stage: Stage, params: Params, dataset: str | None, root: Path) -> bool:
    """`dvc commit --force` the stage just built, when DVC would have built it the same way; True when recorded.

    A failure to record never fails the stage (its outputs are committed and correct): it is
    logged with the command that records it by hand.
    """
    name = dvc_stage_name(stage, dataset)
    reason = lock_skip_reason(stage, params, dataset, root)
    if reason is not None:
        # Only a deliberate other-params run is worth a line; "not a DVC project" is the normal case in scratch roots.
        log.log(logging.INFO if reason.startswith(PARAMS_DIFFER) else logging.DEBUG,
                "dvc.lock not updated for %s: %s", name, reason)
        return False
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = Path(root)
    # DVC's repo lock fails at once when held: parallel Dagster partitions take turns here instead.
    turn = root / ".dvc" / "tmp" / "tokenline-commit.lock"
    turn.parent.mkdir(exist_ok=True)
    with open(turn, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            with Repo(str(root)) as repo:
                repo.commit(name, force=True, relink=False)
        except DvcException as error:
            log.warning("dvc.lock not updated for %s (%s); record it with `dvc commit --force %s`", name, error, name)
            return False
    log.info("recorded %s in dvc.lock", name)
    return True
