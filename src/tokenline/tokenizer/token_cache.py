"""The `tokens` stage's cache: every shard encoded once, so generator training never decodes an image.

:func:`write_token_cache` runs a frozen tokenizer (eval mode, no gradients) and a frozen caption encoder over
the train and val splits of a shards folder, and :class:`TokenCache` reads the result back, memory-mapped.

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

import io
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from tokenline.artifacts import atomic_write_bytes, atomic_write_json
from tokenline.data.stages import iter_shard_samples, read_jsonl
from tokenline.tokenizer.caption_text import cut_or_pad
from tokenline.tokenizer.pixels import batched, samples_to_batch

FORMAT = 1
META = "meta.json"
SPLITS = ("train", "val")
ARRAYS = ("latents", "codes", "text_pooled", "text_tokens", "text_mask")


class StaleTokenCacheError(RuntimeError):
    """A token cache written by another tokenizer than the one the caller expects."""


# -----------------------------------------------------------------------------
# Writing
# -----------------------------------------------------------------------------

def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save into memory, then an atomic write: the file appears complete or not at all."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def _code_kind(quantizer: str) -> str | None:
    """How a quantizer kind's codes are stored: "ids", "bits" or None (no codes)."""
    return {"vq": "ids", "softvq": "ids", "binary": "bits"}.get(quantizer)


def _describe_encoder(encoder: Any) -> Any:
    """The encoder's describe(), that of the encoder a cache wraps, or else its class name."""
    for candidate in (encoder, getattr(encoder, "encoder", None)):
        describe = getattr(candidate, "describe", None)
        if callable(describe):
            return describe()
    return type(encoder).__name__


def write_token_cache(
    tokenizer,
    shard_dir: str | Path,
    captions_dir: str | Path | None,
    out_dir: str | Path,
    tokenizer_hash: str,
    text_encoder=None,
    text_tokens: int = 32,
    batch_size: int = 64,
) -> dict[str, int]:
    """Encode every train and val sample of `shard_dir` with `tokenizer` into `out_dir` (layout: module doc).

    Captions come from ``captions_dir/captions.jsonl`` by sample key; a key it lacks (or ``captions_dir=None``)
    keeps the shard's own caption. `text_encoder` is any object with ``encode(list[str]) -> TextEncoding`` (a
    TextEncoder or a TextEmbeddingCache); None builds the bundled MiniLM. Caption states are cut or padded to
    `text_tokens` positions and, when ``tokenizer.config.text_dim > 0``, condition the encoder.
    `tokenizer_hash` identifies the tokenizer's weights; readers check it to refuse a stale cache.

    Returns the samples written: ``{"train": n, "val": m, "total": n + m}``.
    """
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    if text_tokens < 1:
        raise ValueError(f"text_tokens must be at least 1, got {text_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    config = tokenizer.config
    code_kind = _code_kind(config.quantizer)
    k, d = config.num_tokens, config.token_dim
    codebook_size = len(tokenizer.quantizer.codebook) if code_kind == "ids" else None

    captions: dict[str, str] = {}
    if captions_dir is not None:
        captions_file = Path(captions_dir) / "captions.jsonl"
        if not captions_file.is_file():
            raise FileNotFoundError(f"{captions_file}: no captions file; run the captions stage first")
        captions = {row["key"]: row["caption"] for row in read_jsonl(captions_file) if row.get("caption") is not None}
    index = json.loads((shard_dir / "index.json").read_text())

    if text_encoder is None:
        from tokenline.text.encoder import build_text_encoder

        text_encoder = build_text_encoder("minilm")

    # A crash from here on must not leave an old meta.json vouching for new, partial arrays.
    (out_dir / META).unlink(missing_ok=True)
    device = next(tokenizer.parameters()).device
    was_training = tokenizer.training
    tokenizer.eval()
    counts: dict[str, int] = {}
    text_dims: tuple[int, int] | None = None
    try:
        for split in SPLITS:
            parts: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
            keys: list[str] = []
            texts: list[str] = []
            samples = iter_shard_samples(shard_dir, split)
            progress = tqdm(total=index[split]["samples"], desc=f"tokens {split}", unit="img")
            with progress, torch.no_grad():
                for batch in batched(samples, batch_size):
                    batch_keys = [sample["key"] for sample in batch]
                    batch_texts = [captions.get(key, sample["caption"]) for key, sample in zip(batch_keys, batch)]
                    encoding = text_encoder.encode(batch_texts)
                    states, mask = cut_or_pad(encoding.tokens.float(), encoding.mask, text_tokens)
                    # Round once: the stored float16 text is exactly the text the latents were made from.
                    states = states.half().float()
                    pooled = encoding.pooled.float().half()
                    text_dims = (pooled.shape[-1], states.shape[-1])
                    text = None
                    if config.text_dim:
                        if states.shape[-1] != config.text_dim:
                            raise ValueError(
                                f"the text encoder gives {states.shape[-1]}-wide caption states but the "
                                f"tokenizer is conditioned on text_dim={config.text_dim}"
                            )
                        text = (states.to(device), mask.to(device))
                    out = tokenizer.encode(samples_to_batch(batch, config.image_size).to(device), text)
                    parts["latents"].append(out.latents.float().cpu().numpy())
                    if (out.codes is None) != (code_kind is None):
                        raise ValueError(f"the {config.quantizer!r} quantizer returned unexpected codes")
                    if code_kind == "ids":
                        parts["codes"].append(out.codes.cpu().numpy().astype(np.int32))
                    elif code_kind == "bits":
                        parts["codes"].append(out.codes.cpu().numpy().astype(np.uint8))
                    parts["text_pooled"].append(pooled.cpu().numpy())
                    parts["text_tokens"].append(states.half().cpu().numpy())
                    parts["text_mask"].append(mask.cpu().numpy())
                    keys += batch_keys
                    texts += batch_texts
                    progress.update(len(batch))
            if text_dims is None and not keys:
                empty = text_encoder.encode([])  # an empty encoding still has the widths
                text_dims = (empty.pooled.shape[-1], empty.tokens.shape[-1])
            _write_split(out_dir / split, parts, keys, texts, code_kind, (k, d), text_tokens, text_dims)
            counts[split] = len(keys)
    finally:
        tokenizer.train(was_training)

    if text_dims is None:  # both splits empty and the encoder could not say
        text_dims = (0, 0)
    meta = {
        "format": FORMAT,
        "tokenizer_hash": tokenizer_hash,
        "tokenizer_config": config.to_dict(),
        "quantizer": config.quantizer,
        "num_tokens": k,
        "token_dim": d,
        "codebook_size": codebook_size,
        "has_codes": code_kind is not None,
        "text_tokens": text_tokens,
        "text_dim": int(text_dims[1]),
        "text_pooled_dim": int(text_dims[0]),
        "text_encoder": _describe_encoder(text_encoder),
        "splits": dict(counts),
    }
    atomic_write_json(out_dir / META, meta)
    return {**counts, "total": sum(counts.values())}


def _write_split(
    folder: Path,
    parts: dict[str, list[np.ndarray]],
    keys: list[str],
    texts: list[str],
    code_kind: str | None,
    token_shape: tuple[int, int],
    text_tokens: int,
    text_dims: tuple[int, int] | None,
) -> None:
    """Concatenate one split's batches and write its files (zero-row arrays when it is empty)."""
    k, d = token_shape
    pooled_dim, token_dim = text_dims or (0, 0)
    empty = {
        "latents": np.zeros((0, k, d), np.float32),
        "codes": np.zeros((0, k), np.int32) if code_kind == "ids" else np.zeros((0, k, d), np.uint8),
        "text_pooled": np.zeros((0, pooled_dim), np.float16),
        "text_tokens": np.zeros((0, text_tokens, token_dim), np.float16),
        "text_mask": np.zeros((0, text_tokens), bool),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        if name == "codes" and code_kind is None:
            (folder / "codes.npy").unlink(missing_ok=True)  # left by an earlier cache with codes
            continue
        array = np.concatenate(parts[name]) if parts[name] else empty[name]
        _save_npy(folder / f"{name}.npy", array)
    atomic_write_json(folder / "keys.json", keys)
    atomic_write_json(folder / "captions.json", texts)


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
        a = self._arrays
        item = {
            "latents": torch.from_numpy(np.array(a["latents"][i], dtype=np.float32)),
            "text_pooled": torch.from_numpy(np.array(a["text_pooled"][i], dtype=np.float32)),
            "text_tokens": torch.from_numpy(np.array(a["text_tokens"][i], dtype=np.float32)),
            "text_mask": torch.from_numpy(np.array(a["text_mask"][i], dtype=bool)),
            "index": i,
        }
        if self.has_codes:
            item["codes"] = torch.from_numpy(np.array(a["codes"][i], dtype=np.int64))
        return item

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
        a = self._arrays
        batch = {
            "latents": torch.from_numpy(np.asarray(a["latents"][order], dtype=np.float32)),
            "text_pooled": torch.from_numpy(np.asarray(a["text_pooled"][order], dtype=np.float32)),
            "text_tokens": torch.from_numpy(np.asarray(a["text_tokens"][order], dtype=np.float32)),
            "text_mask": torch.from_numpy(np.asarray(a["text_mask"][order], dtype=bool)),
            "index": torch.from_numpy(order),
        }
        if self.has_codes:
            batch["codes"] = torch.from_numpy(np.asarray(a["codes"][order], dtype=np.int64))
        return batch

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
