"""Atomic writes, manifests, content hashes and output verification: nothing half-written or changed is ever read.

Files and folders get the mode the process umask gives a plain `open` or `mkdir` (0644 and 0755
under umask 022), so a colleague on a shared box can read models and reports: the temporary
file's private 0600 must not survive the rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from tokenline import __version__

MANIFEST = "manifest.json"


def _umask() -> int:
    # os.umask can only be read by setting it: set it back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_mode(directory: bool = False) -> int:
    """The mode a new file (or folder) gets from the process umask: what `open` or `mkdir` would give."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, shared_mode())
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    """Write `value` as indented, key-sorted JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces `final` only if the block succeeds.

    The old folder is moved aside before the new one takes its name, so a reader sees the
    old output, then none, then the complete new one, never a mix.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        temp.chmod(shared_mode(directory=True))
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    trash = None
    if final.exists():
        trash = final.parent / f".{final.name}.{os.getpid()}.old"
        os.replace(final, trash)
    os.replace(temp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def hash_file(path: Path) -> str:
    """SHA-256 of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def content_hash(folder: Path) -> str:
    """SHA-256 over a folder's relative file names and bytes, the manifest excluded."""
    return hash_folder(folder)[0]


def hash_folder(folder: Path) -> tuple[str, dict[str, dict]]:
    """The folder's content hash and, per relative file name, its size, mtime and SHA-256 (one read of each file)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = {}
    for path in _folder_files(folder):
        name = path.relative_to(folder).as_posix()
        digest.update(name.encode() + b"\0")
        file_digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
                file_digest.update(block)
        status = path.stat()
        files[name] = {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "sha256": file_digest.hexdigest()}
    return digest.hexdigest(), files


class DamagedOutputError(RuntimeError):
    """A committed output whose files no longer match its manifest: changed, truncated, added or removed."""
    def __init__(self, folder: Path, file: str, problem: str, manifest: dict):
        self.folder, self.file, self.problem = Path(folder), file, problem
        self.stage = manifest.get("stage", "?")
        dataset = manifest.get("dataset")
        where = f" --dataset {dataset}" if dataset else ""
        super().__init__(
            f"{self.folder / file} {problem} since stage {self.stage!r} wrote it (its manifest says otherwise); "
            f"rebuild it with `tokenline run {self.stage}{where} --force`"
        )


def verify_output(folder: Path, manifest: dict) -> None:
    """Check a committed folder against its manifest: every file there, with its size and bytes; nothing else.

    Sizes and mtimes are compared first, and only a file whose mtime moved is hashed again (a copy
    that kept its bytes passes). A manifest written before per-file records existed is checked by
    hashing the whole folder. Raises DamagedOutputError naming the first file that differs.
    """
    folder = Path(folder)
    recorded = manifest.get("files")
    if recorded is None:
        if content_hash(folder) != manifest.get("content_hash"):
            raise DamagedOutputError(folder, "", "changed", manifest)
        return
    present = {path.relative_to(folder).as_posix(): path for path in _folder_files(folder)}
    for name, record in recorded.items():
        path = present.get(name)
        if path is None:
            raise DamagedOutputError(folder, name, "is missing", manifest)
        status = path.stat()
        if status.st_size != record["size"]:
            raise DamagedOutputError(folder, name, f"changed size ({record['size']} -> {status.st_size} bytes)", manifest)
        if status.st_mtime_ns != record["mtime_ns"] and hash_file(path) != record["sha256"]:
            raise DamagedOutputError(folder, name, "changed", manifest)
    for name in sorted(present.keys() - recorded.keys()):
        raise DamagedOutputError(folder, name, "appeared", manifest)


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None when it has none: such an output counts as absent."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def git_commit(root: Path) -> str | None:
    """The checkout's HEAD commit, with `-dirty` when tracked files changed; None outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def write_manifest(folder: Path, **fields: Any) -> dict:
    """Write the folder's manifest last, with its content hash and a timestamp."""
    digest, files = hash_folder(folder)
    manifest = {
        **fields,
        "content_hash": digest,
        "files": files,
        "package_version": __version__,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON lines (UTF-8, keys sorted): inside a stage's temporary output folder."""
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file written by a stage."""
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]
