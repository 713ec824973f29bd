"""`imagefolder:PATH`: image files in PATH and its subfolders, each with an optional caption.

Which files count as images: every file whose suffix is an image suffix, whatever its
content (a text file named .jpg is offered, and validation rejects it). A caption is the
`.txt` file with the same path and stem. Two images sharing a stem (a.png and a.jpg) both
take that caption and get keys told apart by their suffix. A `.txt` with no image beside it
is yielded as an orphan caption (image None): reported, never counted as an image.

Nothing is read from outside the folder: an image whose path resolves outside it (a symlink
to /etc/passwd, say) is offered with no bytes and `outside_source` in its metadata, so
validation rejects it; a caption that resolves outside counts as missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from tokenline.data.records import Record, inside, safe_key

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


class ImageFolderSource:
    """Images under a folder with same-stem .txt captions."""

    def __init__(self, folder: str | Path, license: str | None = None):
        self.folder = Path(folder).expanduser()
        self.license = license
        if not self.folder.is_dir():
            raise FileNotFoundError(f"imagefolder source: {self.folder} is not a folder")

    def _key(self, path: Path, stem_count: dict[Path, int]) -> str:
        relative = path.relative_to(self.folder).with_suffix("")
        key = safe_key(relative.as_posix())
        if stem_count[path.with_suffix("")] > 1:
            key = f"{key}_{path.suffix.lstrip('.').lower()}"
        return key

    def _caption(self, path: Path) -> bytes | None:
        """The caption file's bytes; None when it is absent or resolves outside the folder."""
        return path.read_bytes() if path.is_file() and inside(path, self.folder) else None

    def _metadata(self, path: Path) -> dict:
        """Source, license and relative path; `outside_source` when the path resolves outside."""
        relative = str(path.relative_to(self.folder))
        metadata = {"source": "imagefolder", "license": self.license, "path": relative}
        if not inside(path, self.folder):
            metadata["outside_source"] = relative
        return metadata

    def records(self, limit: int | None = None) -> Iterator[Record]:
        """Yield image records in path order, then orphan captions."""
        # Dangling links are listed too, so they are counted and rejected rather than vanish.
        files = sorted(p for p in self.folder.rglob("*") if p.is_file() or p.is_symlink())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        stems: dict[Path, int] = {}
        for path in images:
            stems[path.with_suffix("")] = stems.get(path.with_suffix(""), 0) + 1
        seen_keys: set[str] = set()
        for count, path in enumerate(images):
            if limit is not None and count >= limit:
                return
            caption_file = path.with_suffix(".txt")
            key = self._key(path, stems)
            while key in seen_keys:  # "a b.png" and "a_b.png" map to one key
                key += "_"
            seen_keys.add(key)
            metadata = self._metadata(path)
            readable = "outside_source" not in metadata and path.is_file()
            yield Record(
                key=key,
                image=path.read_bytes() if readable else b"",
                image_ext=path.suffix.lstrip(".").lower(),
                caption=self._caption(caption_file),
                metadata=metadata,
            )
        for path in files:
            if path.suffix.lower() == ".txt" and path.with_suffix("") not in stems:
                yield Record(
                    key="orphan_" + safe_key(path.relative_to(self.folder).with_suffix("").as_posix()),
                    image=None,
                    image_ext="",
                    caption=self._caption(path) or b"",
                    metadata=self._metadata(path),
                )

    def describe(self) -> dict:
        """Name and folder."""
        return {"name": "imagefolder", "folder": str(self.folder), "license": self.license}
