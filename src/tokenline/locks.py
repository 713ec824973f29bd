"""One writer per output: an exclusive lock per output folder (and per training `.work` folder).

A lock is `fcntl.flock` on a file beside the folder (`.<name>.lock`). The kernel drops it when
its process ends, however it ends, so the lock of a killed run is free at once: there are no
stale locks to clean up, only a stale holder note, which the next holder overwrites. A second
run does not wait: it fails at once, naming the holder's PID and start time, because a stage can
run for hours and a queue of silent waiters is worse than an error a person can act on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator


class OutputLockedError(RuntimeError):
    """Another process holds the lock of a folder this run would write."""


def lock_file(folder: Path) -> Path:
    """The lock file of a folder: `.<name>.lock` beside it."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def _holder(path: Path) -> str:
    try:
        note = path.read_text().strip()
    except OSError:
        note = ""
    return note or "another process"


def is_locked(folder: Path) -> bool:
    """Whether a run holds the lock of `folder` now (a look, not a claim: the answer can change at once)."""
    path = lock_file(folder)
    if not path.exists():
        return False
    handle = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(handle)  # also releases the lock taken just to look
    return False


@contextlib.contextmanager
def hold_lock(folder: Path) -> Iterator[None]:
    """Hold the exclusive lock of `folder` for the block; OutputLockedError at once when another process has it."""
    path = lock_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLockedError(
                f"{folder} is being written by {_holder(path)}; wait for that run to end (or stop it) and run again"
            ) from None
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"PID {os.getpid()} on {socket.gethostname()} (started {started})\n".encode(), 0)
        yield
    finally:
        os.close(handle)  # closing the descriptor releases the lock


@contextlib.contextmanager
def hold_locks(folders: list[Path]) -> Iterator[None]:
    """Hold the locks of several folders (taken in sorted order) for the block."""
    with contextlib.ExitStack() as stack:
        for folder in sorted(set(map(Path, folders))):
            stack.enter_context(hold_lock(folder))
        yield


def sweep_leftovers(folder: Path) -> list[Path]:
    """Delete what killed runs left beside `folder`: `.<name>.*.tmp` and `.<name>.*.old`; returns what went.

    Only safe while holding the folder's lock: then no live writer owns them.
    """
    folder = Path(folder)
    return _sweep(folder.parent, (f".{folder.name}.*.tmp", f".{folder.name}.*.old"))


def sweep_work_folder(work: Path) -> list[Path]:
    """Delete the hidden `.*.tmp` and `.*.old` entries a killed training run left inside its `.work` folder."""
    return _sweep(Path(work), (".*.tmp", ".*.old"))


def _sweep(parent: Path, patterns: tuple[str, ...]) -> list[Path]:
    if not parent.is_dir():
        return []
    gone = []
    for pattern in patterns:
        for path in parent.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            gone.append(path)
    return gone
