"""Writing the token cache (layout and guarantees: tokenline.tokenizer.token_cache): every shard encoded once."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tokenline.artifacts import atomic_write_bytes, atomic_write_json, read_jsonl
from tokenline.data.shards import iter_shard_samples
from tokenline.text.captions import cut_or_pad
from tokenline.text.encoder import build_text_encoder
from tokenline.tokenizer.pixels import batched, samples_to_batch
from tokenline.tokenizer.token_cache import ARRAYS, FORMAT, META, SPLITS


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
    codebook_size = len(tokenizer.quantizer.codebook) if code_kind == "ids" else None

    captions = _stage_captions(captions_dir)
    index = json.loads((shard_dir / "index.json").read_text())
    if text_encoder is None:
        text_encoder = build_text_encoder("minilm")

    # A crash from here on must not leave an old meta.json vouching for new, partial arrays.
    (out_dir / META).unlink(missing_ok=True)
    was_training = tokenizer.training
    tokenizer.eval()
    counts: dict[str, int] = {}
    text_dims: tuple[int, int] | None = None
    try:
        for split in SPLITS:
            parts, keys, texts, dims = _encode_split(tokenizer, shard_dir, split, index[split]["samples"], captions,
                                                     text_encoder, text_tokens, batch_size, code_kind)
            text_dims = dims or text_dims
            if text_dims is None and not keys:
                empty = text_encoder.encode([])  # an empty encoding still has the widths
                text_dims = (empty.pooled.shape[-1], empty.tokens.shape[-1])
            token_shape = (config.num_tokens, config.token_dim)
            _write_split(out_dir / split, parts, keys, texts, code_kind, token_shape, text_tokens, text_dims)
            counts[split] = len(keys)
    finally:
        tokenizer.train(was_training)

    if text_dims is None:  # both splits empty and the encoder could not say
        text_dims = (0, 0)
    meta = _cache_meta(config, tokenizer_hash, codebook_size, code_kind, text_tokens, text_dims, text_encoder, counts)
    atomic_write_json(out_dir / META, meta)
    return {**counts, "total": sum(counts.values())}


def _cache_meta(config, tokenizer_hash: str, codebook_size: int | None, code_kind: str | None, text_tokens: int,
                text_dims: tuple[int, int], text_encoder, counts: dict[str, int]) -> dict[str, Any]:
    """meta.json: what made the cache (tokenizer hash and config, text encoder) and the shapes readers check."""
    return {
        "format": FORMAT,
        "tokenizer_hash": tokenizer_hash,
        "tokenizer_config": config.to_dict(),
        "quantizer": config.quantizer,
        "num_tokens": config.num_tokens,
        "token_dim": config.token_dim,
        "codebook_size": codebook_size,
        "has_codes": code_kind is not None,
        "text_tokens": text_tokens,
        "text_dim": int(text_dims[1]),
        "text_pooled_dim": int(text_dims[0]),
        "text_encoder": _describe_encoder(text_encoder),
        "splits": dict(counts),
    }


def _encode_split(tokenizer, shard_dir: Path, split: str, total: int, captions: dict[str, str], text_encoder,
                  text_tokens: int, batch_size: int, code_kind: str | None):
    """One split's rows in batches: (arrays by name as lists of batches, keys, captions, the caption widths or None)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
    keys: list[str] = []
    texts: list[str] = []
    text_dims = None
    with tqdm(total=total, desc=f"tokens {split}", unit="img") as progress, torch.no_grad():
        for batch in batched(iter_shard_samples(shard_dir, split), batch_size):
            batch_keys = [sample["key"] for sample in batch]
            batch_texts = [captions.get(key, sample["caption"]) for key, sample in zip(batch_keys, batch)]
            arrays, text_dims = _encode_batch(tokenizer, batch, batch_texts, text_encoder, text_tokens, code_kind)
            for name, array in arrays.items():
                parts[name].append(array)
            keys += batch_keys
            texts += batch_texts
            progress.update(len(batch))
    return parts, keys, texts, text_dims


def _stage_captions(captions_dir: str | Path | None) -> dict[str, str]:
    """Sample key -> caption from a captions stage output (empty without one)."""
    if captions_dir is None:
        return {}
    captions_file = Path(captions_dir) / "captions.jsonl"
    if not captions_file.is_file():
        raise FileNotFoundError(f"{captions_file}: no captions file; run the captions stage first")
    return {row["key"]: row["caption"] for row in read_jsonl(captions_file) if row.get("caption") is not None}


def _encode_batch(tokenizer, batch: list[dict], texts: list[str], text_encoder, text_tokens: int,
                  code_kind: str | None) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """One batch's cache rows (latents, codes, caption states) and the caption widths (pooled, per token)."""
    config = tokenizer.config
    device = next(tokenizer.parameters()).device
    encoding = text_encoder.encode(texts)
    states, mask = cut_or_pad(encoding.tokens.float(), encoding.mask, text_tokens)
    # Round once: the stored float16 text is exactly the text the latents were made from.
    states = states.half().float()
    pooled = encoding.pooled.float().half()
    text = None
    if config.text_dim:
        if states.shape[-1] != config.text_dim:
            raise ValueError(
                f"the text encoder gives {states.shape[-1]}-wide caption states but the "
                f"tokenizer is conditioned on text_dim={config.text_dim}"
            )
        text = (states.to(device), mask.to(device))
    out = tokenizer.encode(samples_to_batch(batch, config.image_size).to(device), text)
    if (out.codes is None) != (code_kind is None):
        raise ValueError(f"the {config.quantizer!r} quantizer returned unexpected codes")
    arrays = {
        "latents": out.latents.float().cpu().numpy(),
        "text_pooled": pooled.cpu().numpy(),
        "text_tokens": states.half().cpu().numpy(),
        "text_mask": mask.cpu().numpy(),
    }
    if code_kind is not None:
        arrays["codes"] = out.codes.cpu().numpy().astype(np.int32 if code_kind == "ids" else np.uint8)
    return arrays, (pooled.shape[-1], states.shape[-1])


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
