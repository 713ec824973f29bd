"""`webdataset:URL_OR_GLOB`: local or remote tar shards, read by webdataset itself.

A URL may use brace expansion ({0000..0575}); a local glob is expanded here. Each sample's
first image member is the image; `.txt` (or `.caption`) the caption; `.json` merged into
metadata.
"""

from __future__ import annotations

import glob
import json
from typing import Iterator

from tokenline.data.records import Record, safe_key

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
CAPTION_MEMBERS = ("txt", "caption")


class WebDatasetSource:
    """Samples from webdataset tar shards."""

    def __init__(self, urls: str, license: str | None = None):
        self.urls = urls
        self.license = license

    def _shard_list(self) -> str | list[str]:
        if "://" in self.urls or "{" in self.urls:
            return self.urls
        matches = sorted(glob.glob(self.urls))
        if not matches:
            raise FileNotFoundError(f"webdataset source: no shards match {self.urls!r}")
        return matches

    def records(self, limit: int | None = None) -> Iterator[Record]:
        """Yield samples in shard order (undecoded bytes)."""
        import webdataset as wds

        # Raw bytes on purpose: validation decides what decodes.
        dataset = wds.WebDataset(self._shard_list(), shardshuffle=False, empty_check=False)
        for count, sample in enumerate(dataset):
            if limit is not None and count >= limit:
                return
            image_ext = next((ext for ext in IMAGE_MEMBERS if ext in sample), None)
            caption = next((sample[ext] for ext in CAPTION_MEMBERS if ext in sample), None)
            metadata = {"source": "webdataset", "license": self.license, "url": sample.get("__url__")}
            if "json" in sample:
                try:
                    metadata["sample"] = json.loads(sample["json"])
                except (json.JSONDecodeError, UnicodeDecodeError):
                    metadata["sample_json_error"] = True
            yield Record(
                key=safe_key(f"{count:08d}_{sample['__key__']}"),
                image=sample[image_ext] if image_ext else b"",
                image_ext=image_ext or "bin",
                caption=caption,
                metadata=metadata,
            )

    def describe(self) -> dict:
        """Name and shard URLs."""
        return {"name": "webdataset", "urls": self.urls, "license": self.license}
