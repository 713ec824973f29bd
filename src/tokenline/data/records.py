"""The record every data source yields, and the interface a source implements."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")


class SourceFormatError(ValueError):
    """A data source's own file (an annotations file, a listing) is malformed; the message says where."""


@dataclass
class Record:
    """One sample as a source offers it: encoded image bytes, raw caption, metadata.

    `image` is None for a caption file that has no image beside it (an orphan caption):
    it is reported, never counted as an image. `caption` stays as the source gave it
    (bytes from a file, str from metadata, None when missing); validation decodes it.
    """

    key: str
    image: bytes | None
    image_ext: str
    caption: bytes | str | None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Keys become file names and webdataset keys: no dots, slashes or spaces.
        if not KEY_PATTERN.match(self.key):
            raise ValueError(f"record key {self.key!r} must match {KEY_PATTERN.pattern}")
        for required in ("source", "license"):
            self.metadata.setdefault(required, None)


class Source(Protocol):
    """A dataset source: yields records in a deterministic order."""

    def records(self, limit: int | None) -> Iterator[Record]:
        """Yield at most `limit` records (all when None), deterministically."""
        ...

    def describe(self) -> dict:
        """Say what the source is (name, location, license) for manifests."""
        ...


def safe_key(text: str) -> str:
    """Turn a path or name into a record key: runs of other characters become `_`."""
    key = re.sub(r"[^A-Za-z0-9\-]+", "_", text).strip("_")
    return key or "record"


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, symlinks and `..` resolved, stays inside `root`."""
    # A source reads nothing beyond its root: a link or `../` name must not pull in /etc/passwd.
    return path.resolve().is_relative_to(root.resolve())
