"""`coco:ANNOTATIONS_JSON,IMAGE_DIR`: COCO-style caption annotations.

One record per image, its caption the first annotation (by annotation id); the others are
kept in metadata as `all_captions`. Images the annotations name but the folder lacks are
offered as zero-byte files, so validation counts and rejects them. A `file_name` that
resolves outside IMAGE_DIR (`../x.png`, `/etc/passwd`, a symlink out) is not read: the
record carries no bytes and `outside_source`, and validation rejects it. An annotations
file with a missing field or a wrong type fails at once with a `SourceFormatError`.
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import Iterator

from tokenline.data.records import Record, SourceFormatError, inside, safe_key


class CocoSource:
    """Images and captions from a COCO captions annotation file."""

    def __init__(self, annotations: str | Path, image_dir: str | Path, license: str | None = None):
        self.annotations = Path(annotations).expanduser()
        self.image_dir = Path(image_dir).expanduser()
        self.license = license
        if not self.annotations.is_file():
            raise FileNotFoundError(f"coco source: annotations file {self.annotations} does not exist")

    def _field(self, item: object, where: str, name: str, types: tuple[type, ...], required: bool = True):
        """`item[name]` checked against `types`; a missing required field or a wrong type is a SourceFormatError."""
        if not isinstance(item, dict):
            raise SourceFormatError(f"{self.annotations}: {where} is {reprlib.repr(item)}, not an object")
        if item.get(name) is None and not required:  # an optional field may be absent or null
            return None
        if name not in item:
            raise SourceFormatError(f"{self.annotations}: {where} has no {name!r}")
        value = item[name]
        # bool is an int in Python, but `"id": true` is as wrong as `"id": "7"`.
        if not isinstance(value, types) or isinstance(value, bool):
            expected = " or ".join(t.__name__ for t in types)
            # reprlib keeps the line short when the wrong value is a whole list or object.
            raise SourceFormatError(f"{self.annotations}: {where + '.' if where else ''}{name} is {reprlib.repr(value)}, not {expected}")
        return value

    def _document(self) -> dict:
        """The parsed annotations file, its top-level lists checked."""
        try:
            document = json.loads(self.annotations.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SourceFormatError(f"{self.annotations}: not valid JSON ({error})") from None
        if not isinstance(document, dict):
            raise SourceFormatError(f"{self.annotations}: the top level is {reprlib.repr(document)}, not an object")
        for name in ("images", "annotations", "licenses"):
            self._field(document, "", name, (list,), required=False)
        return document

    def records(self, limit: int | None = None) -> Iterator[Record]:
        """Yield one record per annotated image, in image id order."""
        document = self._document()
        licenses = {}
        for index, item in enumerate(document.get("licenses") or []):
            where = f"licenses[{index}]"
            licenses[self._field(item, where, "id", (int, str))] = self._field(item, where, "name", (str,), required=False)
        captions: dict[int, list[tuple[int, str]]] = {}
        for index, annotation in enumerate(document.get("annotations") or []):
            where = f"annotations[{index}]"
            image_id = self._field(annotation, where, "image_id", (int,))
            number = self._field(annotation, where, "id", (int,), required=False) or 0
            captions.setdefault(image_id, []).append((number, self._field(annotation, where, "caption", (str,))))
        images = []
        for index, image in enumerate(document.get("images") or []):
            where = f"images[{index}]"
            self._field(image, where, "file_name", (str,))
            self._field(image, where, "license", (int, str), required=False)
            images.append((self._field(image, where, "id", (int,)), image))
        images.sort(key=lambda pair: pair[0])
        for count, (image_id, image) in enumerate(images):
            if limit is not None and count >= limit:
                return
            path = self.image_dir / image["file_name"]
            texts = [text for _, text in sorted(captions.get(image_id, []), key=lambda pair: pair[0])]
            metadata = {
                "source": "coco",
                "license": licenses.get(image.get("license")) or self.license,
                "file_name": image["file_name"],
                "all_captions": texts,
            }
            readable = inside(path, self.image_dir)
            if not readable:
                metadata["outside_source"] = image["file_name"]
            yield Record(
                key=safe_key(f"coco_{image_id}"),
                image=path.read_bytes() if readable and path.is_file() else b"",
                image_ext=path.suffix.lstrip(".").lower() or "jpg",
                caption=texts[0] if texts else None,
                metadata=metadata,
            )

    def describe(self) -> dict:
        """Name and paths."""
        return {"name": "coco", "annotations": str(self.annotations), "image_dir": str(self.image_dir)}
