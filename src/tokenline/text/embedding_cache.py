"""A per-caption disk cache of a frozen text encoder's outputs, keyed by the encoder's fingerprint and the caption."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenline.artifacts import atomic_write_bytes
from tokenline.text.encoder import TextEncoder, TextEncoding


class TextEmbeddingCache:
    """Per-caption disk cache of one encoder's outputs, in safetensors shards that carry their own index.

    Each call that computes misses writes ``<folder>/<fingerprint>-<uuid>.safetensors`` shards holding
    ``pooled``, ``tokens`` and ``mask`` (token axis trimmed to the longest caption in the shard, restored on
    load) and, in the header metadata, the JSON list of the rows' keys. A shard is written to a temporary
    name, fsynced and renamed, so its data and its index entries appear together or not at all: a crash can
    leave at worst a stray ``.*.tmp`` file, which is ignored. There is no global index to rewrite, so writing
    stays linear in the number of captions and concurrent writers cannot lose each other's entries; opening
    the cache reads the headers of this encoder's shards. Encoders with other fingerprints may share the
    folder.

    ``hits`` / ``misses`` count requested captions found / not found on disk (a caption repeated within one
    call counts each time; it is computed once).
    """

    def __init__(self, folder: Path | str, encoder: TextEncoder, shard_size: int = 1024) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.encoder = encoder
        self.shard_size = shard_size
        self._fingerprint = encoder.fingerprint()
        self._index = self._scan()  # key -> (shard file name, row)
        self.hits = 0
        self.misses = 0

    def key(self, caption: str) -> str:
        """Cache key of `caption` for this encoder."""
        # surrogatepass: captions decoded with errors="surrogateescape" still get a stable key.
        material = f"{self._fingerprint}\n{caption}".encode("utf-8", "surrogatepass")
        return hashlib.sha256(material).hexdigest()

    def __contains__(self, caption: str) -> bool:
        return self.key(caption) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def encode(self, captions: list[str]) -> TextEncoding:
        """Encodings of `captions`, read from disk where cached; misses are computed, stored and returned."""
        if isinstance(captions, str):
            raise TypeError("encode() takes a list of captions, not a single str")
        captions = list(captions)
        if not captions:
            return self.encoder.encode([])
        keys = [self.key(c) for c in captions]
        todo = {k: c for k, c in zip(keys, captions) if k not in self._index}  # dict: unique, in order
        missed = sum(k in todo for k in keys)
        self.misses += missed
        self.hits += len(keys) - missed

        rows: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if todo:
            fresh = self.encoder.encode(list(todo.values())).to("cpu")
            self._store(list(todo), fresh)
            rows.update({k: (fresh.pooled[i], fresh.tokens[i], fresh.mask[i]) for i, k in enumerate(todo)})
        rows.update(self._load([k for k in dict.fromkeys(keys) if k not in rows]))
        return TextEncoding(
            torch.stack([rows[k][0] for k in keys]),
            torch.stack([rows[k][1] for k in keys]),
            torch.stack([rows[k][2] for k in keys]),
        ).to(self.encoder.device)

    def _scan(self) -> dict[str, tuple[str, int]]:
        from safetensors import safe_open

        index = {}
        for shard in sorted(self.folder.glob(f"{self._fingerprint}-*.safetensors")):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    keys = json.loads(f.metadata()["keys"])
            except Exception as err:  # noqa: BLE001 - any unreadable shard gets the same clear message
                raise ValueError(f"text embedding cache shard {shard} is unreadable ({err}); delete it") from err
            index.update({k: (shard.name, row) for row, k in enumerate(keys)})
        return index

    def _load(self, keys: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        from safetensors import safe_open

        by_shard: dict[str, list[tuple[str, int]]] = {}
        for k in keys:
            shard, row = self._index[k]
            by_shard.setdefault(shard, []).append((k, row))
        out = {}
        for shard, wanted in by_shard.items():
            with safe_open(str(self.folder / shard), framework="pt") as f:
                pooled, tokens, mask = f.get_slice("pooled"), f.get_slice("tokens"), f.get_slice("mask")
                for k, row in wanted:
                    one = slice(row, row + 1)
                    out[k] = (pooled[one][0], self._pad(tokens[one][0]), self._pad(mask[one][0]))
        return out

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Restore the token axis trimmed at write time (zeros / False beyond it)."""
        missing = self.encoder.max_tokens - x.shape[0]
        return F.pad(x, (0, 0, 0, missing)) if x.dim() == 2 else F.pad(x, (0, missing))

    def _store(self, keys: list[str], enc: TextEncoding) -> None:
        from safetensors.torch import save

        for start in range(0, len(keys), self.shard_size):
            stop = start + self.shard_size
            mask = enc.mask[start:stop]
            # Trim trailing all-padding positions: captions are usually far shorter than max_tokens.
            used = mask.any(dim=0).nonzero()
            length = int(used.max()) + 1 if len(used) else 1
            tensors = {
                "pooled": enc.pooled[start:stop].contiguous(),
                "tokens": enc.tokens[start:stop, :length].contiguous(),
                "mask": mask[:, :length].contiguous(),
            }
            metadata = {"encoder": json.dumps(self.encoder.describe()), "keys": json.dumps(keys[start:stop])}
            shard = f"{self._fingerprint}-{uuid.uuid4().hex}.safetensors"
            atomic_write_bytes(self.folder / shard, save(tensors, metadata=metadata))
            self._index.update({k: (shard, row) for row, k in enumerate(keys[start:stop])})
