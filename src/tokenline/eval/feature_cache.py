"""Inception features on disk, per image: an eval pays for an image's 299-px Inception forward once.

On a CPU the Inception forward is nearly all of an eval's time (about 0.2 s per image on two
cores), and the same images come back: gen_eval, student_eval and the student's FID watch each
score the reference set, and student_eval regenerates the teacher's samples gen_eval already
scored (same weights, prompts and seed give the same pixels). Keys are the SHA-256 of the image's
uint8 pixels and shape together with the Inception weights' name, so a changed image or network
misses. Shards are safetensors written whole by an atomic rename, one per call that misses, their
keys in the header; a crash leaves at most a temporary file, which is ignored. Safe to delete.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import safetensors.torch
from safetensors import safe_open
from torch import Tensor

from tokenline.artifacts import atomic_write_bytes


def feature_cache_dir(root: Path) -> Path:
    """The per-project Inception feature cache (safe to delete)."""
    return Path(root) / "data" / ".inception_cache"


class FeatureCache:
    """Per-image Inception features of one network, in safetensors shards that carry their keys."""

    def __init__(self, folder: Path | str, network: str):
        """`network` names the weights (a change of network must change it)."""
        self.folder = Path(folder)
        self.network = network
        self._index: dict[str, tuple[Path, int]] = {}
        for shard in sorted(self.folder.glob(f"{network}-*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                for row, key in enumerate(json.loads(handle.metadata()["keys"])):
                    self._index[key] = (shard, row)

    def keys(self, images: Tensor) -> list[str]:
        """The key of each uint8 image [N, 3, H, W]."""
        prefix = f"{self.network}\n{tuple(images.shape[1:])}\n".encode()
        return [hashlib.sha256(prefix + image.contiguous().numpy().tobytes()).hexdigest() for image in images]

    def load(self, keys: list[str]) -> dict[str, Tensor]:
        """The cached features of those `keys` that are on disk."""
        found: dict[str, Tensor] = {}
        by_shard: dict[Path, list[tuple[str, int]]] = {}
        for key in keys:
            if key in self._index:
                shard, row = self._index[key]
                by_shard.setdefault(shard, []).append((key, row))
        for shard, rows in by_shard.items():
            features = safetensors.torch.load_file(shard)["features"]
            found |= {key: features[row] for key, row in rows}
        return found

    def store(self, keys: list[str], features: Tensor) -> None:
        """Write one shard of `features` [N, F] under `keys`."""
        if not keys:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        shard = self.folder / f"{self.network}-{uuid.uuid4().hex}.safetensors"
        data = safetensors.torch.save({"features": features.contiguous()}, metadata={"keys": json.dumps(keys)})
        atomic_write_bytes(shard, data)
        self._index |= {key: (shard, row) for row, key in enumerate(keys)}
