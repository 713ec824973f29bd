"""`imagefolder:PATH`: image files in PATH and its subfolders, each with an optional caption.

Which files count as images: every file whose suffix is an image suffix, whatever its
content (a text file named .jpg is offered, and validation rejects it). A caption is the
`.txt` file with the same path and stem. Two images sharing a stem (a.png and a.jpg) both
take that caption and get keys told apart by their suffix. A `.txt` with no image beside it
is yielded as an orphan caption (image None): reported, never counted as an image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from tokenline.data.records import Record, safe_key

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

    def records(self, limit: int | None = None) -> Iterator[Record]:
        """Yield image records in path order, then orphan captions."""
        files = sorted(p for p in self.folder.rglob("*") if p.is_file())
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
            yield Record(
                key=key,
                image=path.read_bytes(),
                image_ext=path.suffix.lstrip(".").lower(),
                caption=caption_file.read_bytes() if caption_file.exists() else None,
                metadata={"source": "imagefolder", "license": self.license, "path": str(path.relative_to(self.folder))},
            )
        for path in files:
            if path.suffix.lower() == ".txt" and path.with_suffix("") not in stems:
                yield Record(
                    key="orphan_" + safe_key(path.relative_to(self.folder).with_suffix("").as_posix()),
                    image=None,
                    image_ext="",
                    caption=path.read_bytes(),
                    metadata={"source": "imagefolder", "license": self.license, "path": str(path.relative_to(self.folder))},
                )

    def describe(self) -> dict:
        """Name and folder."""
        return {"name": "imagefolder", "folder": str(self.folder), "license": self.license}
