"""The `tokens` stage's cache: every shard encoded once, so generator training never decodes an image.

:func:`tokenline.tokenizer.token_cache_writer.write_token_cache` runs a frozen tokenizer (eval mode, no
gradients) and a frozen caption encoder over the train and val splits of a shards folder, and
:class:`TokenCache` (this module) reads the result back, memory-mapped.

On-disk layout (N = samples in the split, K = tokens per image, D = token width, T = ``text_tokens``,
Dtxt = caption token width)::

    <out_dir>/
        meta.json               written last: its presence means every array below is complete
        train/
            latents.npy         float32 [N, K, D]   what the tokenizer's decoder reads
            codes.npy           only when the quantizer has codes:
                                  vq, softvq  int32 [N, K]      codebook ids
                                  binary      uint8 [N, K, D]   bits, 1 = +1 and 0 = -1
            text_pooled.npy     float16 [N, Dtxt_pooled]   pooled caption embedding
            text_tokens.npy     float16 [N, T, Dtxt]       caption token states, zero where padded
            text_mask.npy       bool    [N, T]             True on real caption tokens
            keys.json           list of N sample keys, in row order
            captions.json       list of N captions, in row order
        val/
            ... the same files; an empty split holds zero-row arrays of the same trailing shapes

``meta.json`` holds ``format`` (1), ``tokenizer_hash``, ``tokenizer_config``, ``quantizer``, ``num_tokens``,
``token_dim``, ``codebook_size`` (None for binary and kl), ``has_codes``, ``text_tokens``, ``text_dim`` (width of
the token states), ``text_pooled_dim``, ``text_encoder`` (its ``describe()``, else its class name) and ``splits``
(samples per split).

Every file is written through a temporary file and a rename, and an earlier ``meta.json`` is removed before
anything else is written: a crash leaves a folder that :class:`TokenCache` refuses as incomplete, never a mix of
old and new arrays that looks complete.

For text-conditioned tokenizers the caption states are rounded to float16 *before* they condition the
encoder, so the stored text is exactly the text that produced the stored latents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


FORMAT = 1
META = "meta.json"
SPLITS = ("train", "val")
ARRAYS = ("latents", "codes", "text_pooled", "text_tokens", "text_mask")
# What a row reads as (codes: ids or bits, both as int64), whatever the stored dtype.
ROW_DTYPES = {"latents": np.float32, "codes": np.int64, "text_pooled": np.float32, "text_tokens": np.float32, "text_mask": bool}


class StaleTokenCacheError(RuntimeError):
    """A token cache written by another tokenizer than the one the caller expects."""


# -----------------------------------------------------------------------------
# Reading
# -----------------------------------------------------------------------------

class DamagedTokenCacheError(ValueError):
    """A token cache file that cannot be read or holds values no tokenizer writes (truncated, garbled)."""


def _damaged(path: Path, problem: str) -> DamagedTokenCacheError:
    return DamagedTokenCacheError(f"{path}: {problem}; the token cache is damaged: rebuild it with "
                                  "`tokenline run tokens --force`")


def _open_array(path: Path) -> np.ndarray:
    """Memory-map one cache array (rows are read on access, nothing is loaded whole), or name the file that fails."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # truncated ("mmap length is greater than file size"), garbled header
        raise _damaged(path, " ".join(str(error).split())) from None


def _read_list(path: Path) -> list:
    """A JSON list of the cache (keys, captions), or name the file that is not one."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise _damaged(path, " ".join(str(error).split())) from None
    if not isinstance(value, list):
        raise _damaged(path, "is not a JSON list")
    return value


def _refuse_bad_values(base: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Refuse, when the cache is opened rather than mid-training, non-finite floats and codes outside the codebook.

    One pass over each array: the cost of reading the cache once, paid before any step runs.
    """
    for name in ("latents", "text_pooled", "text_tokens"):
        if name in arrays and arrays[name].size and not np.isfinite(arrays[name]).all():
            raise _damaged(base / f"{name}.npy", "holds non-finite values (NaN or infinity)")
    if "codes" in arrays and arrays["codes"].size:
        codes = arrays["codes"]
        high = meta.get("codebook_size") or 2  # binary codes are bits
        low_found, high_found = int(codes.min()), int(codes.max())
        if low_found < 0 or high_found >= high:
            raise _damaged(base / "codes.npy", f"holds codes in [{low_found}, {high_found}], outside the codebook [0, {high - 1}]")


class TokenCache(Dataset):
    """One split of a token cache as a map-style dataset; arrays stay memory-mapped on disk.

    ``cache[i]`` is a dict of torch tensors: ``latents`` float32 [K, D], ``codes`` (only when the quantizer has
    codes: long [K] ids for vq/softvq, long 0/1 [K, D] bits for binary), ``text_pooled`` float32 [Dtxt],
    ``text_tokens`` float32 [T, Dtxt], ``text_mask`` bool [T], and ``index`` (the row, an int).
    """

    def __init__(self, folder: str | Path, split: str = "train", expect_tokenizer_hash: str | None = None):
        """Open `split` of the cache in `folder`; with `expect_tokenizer_hash`, refuse another tokenizer's cache.

        Raises FileNotFoundError when meta.json is missing (the cache was never finished) and
        StaleTokenCacheError when the cache's tokenizer hash differs from the expected one.
        """
        self.folder = Path(folder)
        meta_path = self.folder / META
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"the token cache at {self.folder} is missing or incomplete (no {META}); "
                "run `tokenline run tokens` to write it"
            )
        self._meta = json.loads(meta_path.read_text())
        if self._meta.get("format") != FORMAT:
            raise ValueError(f"the token cache at {self.folder} has format {self._meta.get('format')!r}, "
                             f"this tokenline reads format {FORMAT}; re-run `tokenline run tokens`")
        found = self._meta["tokenizer_hash"]
        if expect_tokenizer_hash is not None and found != expect_tokenizer_hash:
            raise StaleTokenCacheError(
                f"the token cache at {self.folder} was written by tokenizer {found}, "
                f"but tokenizer {expect_tokenizer_hash} is expected; re-run `tokenline run tokens`"
            )
        if split not in self._meta["splits"]:
            raise ValueError(f"the token cache at {self.folder} has no split {split!r}; "
                             f"it has {sorted(self._meta['splits'])}")
        self.split = split
        base = self.folder / split
        names = [n for n in ARRAYS if n != "codes" or self.has_codes]
        self._arrays = {name: _open_array(base / f"{name}.npy") for name in names}
        self._keys = _read_list(base / "keys.json")
        self._captions = _read_list(base / "captions.json")
        expected = self._meta["splits"][split]
        lengths = {name: len(array) for name, array in self._arrays.items()}
        if set(lengths.values()) | {len(self._keys), len(self._captions)} != {expected}:
            raise ValueError(f"the token cache at {self.folder} is inconsistent: meta.json says {expected} "
                             f"{split} samples, files hold {lengths}, {len(self._keys)} keys and "
                             f"{len(self._captions)} captions; re-run `tokenline run tokens`")
        _refuse_bad_values(base, self._arrays, self._meta)

    @property
    def meta(self) -> dict[str, Any]:
        """The parsed meta.json."""
        return self._meta

    @property
    def keys(self) -> list[str]:
        """Sample keys, in row order."""
        return self._keys

    @property
    def captions(self) -> list[str]:
        """Captions, in row order."""
        return self._captions

    @property
    def has_codes(self) -> bool:
        """Whether the cache stores discrete codes (vq, softvq, binary) besides latents."""
        return bool(self._meta["has_codes"])

    def __len__(self) -> int:
        """Samples in this split."""
        return len(self._keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Row `i` as writable torch tensors (copied out of the memory map)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a token cache split of {n} samples")
        i = int(i) % n
        # np.array copies the row out of the read-only memory map, so the tensors are writable.
        return {**self._read(i, np.array), "index": i}

    def latent_statistics(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of this split's latents, read in chunks from the memory map."""
        latents = self._arrays["latents"]
        width = latents.shape[-1]
        total, sums, squares = 0, np.zeros(width), np.zeros(width)
        for start in range(0, len(latents), 4096):
            chunk = np.asarray(latents[start : start + 4096], dtype=np.float64).reshape(-1, width)
            total += len(chunk)
            sums += chunk.sum(0)
            squares += (chunk**2).sum(0)
        mean = sums / max(total, 1)
        std = np.sqrt(np.maximum(squares / max(total, 1) - mean**2, 0.0))
        # A dead channel (std 0) must not blow standardized inputs up.
        return mean.tolist(), np.maximum(std, 1e-4).tolist()

    def rows(self, indices) -> dict[str, Tensor]:
        """Rows `indices` batched, read in one go per array: the dict of __getitem__ with a leading batch axis."""
        order = np.asarray(indices, dtype=np.int64)
        # Fancy indexing already copies out of the memory map.
        return {**self._read(order, np.asarray), "index": torch.from_numpy(order)}

    def _read(self, selector, to_array) -> dict[str, Tensor]:
        """Every array of the split at `selector` (a row or an index array), as tensors of the reading dtypes."""
        return {name: torch.from_numpy(to_array(array[selector], dtype=ROW_DTYPES[name])) for name, array in self._arrays.items()}

    def loader(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> DataLoader:
        """A DataLoader over this process's share: every `world_size`-th index of one permutation, from `rank`.

        All ranks draw the same permutation (from `seed` and the epoch), so their shares are disjoint and
        together cover the split. The permutation changes each time the loader is iterated (epoch 0, 1, ...);
        ranks that iterate equally often stay in step. Shares differ in length by at most one sample.
        """
        sampler = ShardedSampler(len(self), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
        return DataLoader(self, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=0)


class ShardedSampler(Sampler[int]):
    """Indices [rank::world_size] of a permutation of range(n) seeded by (seed, epoch); epoch advances per pass."""

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        """Share `rank` of `world_size` over `n` indices; shuffle=False keeps the order 0..n-1."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation of the next pass (it otherwise advances by one each pass)."""
        self.epoch = epoch

    def indices(self, epoch: int) -> list[int]:
        """This rank's indices in `epoch`."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        """This pass's indices; the next pass uses the next epoch."""
        indices = self.indices(self.epoch)
        self.epoch += 1
        return iter(indices)

    def __len__(self) -> int:
        """Indices per pass for this rank."""
        return len(range(self.rank, self.n, self.world_size))
