"""`coco:ANNOTATIONS_JSON,IMAGE_DIR`: COCO-style caption annotations.

One record per image, its caption the first annotation (by annotation id); the others are
kept in metadata as `all_captions`. Images the annotations name but the folder lacks are
offered as zero-byte files, so validation counts and rejects them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from tokenline.data.records import Record, safe_key


class CocoSource:
    """Images and captions from a COCO captions annotation file."""

    def __init__(self, annotations: str | Path, image_dir: str | Path, license: str | None = None):
        self.annotations = Path(annotations).expanduser()
        self.image_dir = Path(image_dir).expanduser()
        self.license = license
        if not self.annotations.is_file():
            raise FileNotFoundError(f"coco source: annotations file {self.annotations} does not exist")

    def records(self, limit: int | None = None) -> Iterator[Record]:
        """Yield one record per annotated image, in image id order."""
        document = json.loads(self.annotations.read_text())
        licenses = {item.get("id"): item.get("name") for item in document.get("licenses", [])}
        captions: dict[int, list[tuple[int, str]]] = {}
        for annotation in document.get("annotations", []):
            captions.setdefault(annotation["image_id"], []).append((annotation.get("id", 0), annotation.get("caption")))
        images = sorted(document.get("images", []), key=lambda item: item["id"])
        for count, image in enumerate(images):
            if limit is not None and count >= limit:
                return
            path = self.image_dir / image["file_name"]
            texts = [text for _, text in sorted(captions.get(image["id"], []), key=lambda pair: pair[0])]
            yield Record(
                key=safe_key(f"coco_{image['id']}"),
                image=path.read_bytes() if path.is_file() else b"",
                image_ext=path.suffix.lstrip(".").lower() or "jpg",
                caption=texts[0] if texts else None,
                metadata={
                    "source": "coco",
                    "license": licenses.get(image.get("license")) or self.license,
                    "file_name": image["file_name"],
                    "all_captions": texts,
                },
            )

    def describe(self) -> dict:
        """Name and paths."""
        return {"name": "coco", "annotations": str(self.annotations), "image_dir": str(self.image_dir)}
