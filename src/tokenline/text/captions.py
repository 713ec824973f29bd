"""Captions as model input: a stage's caption map, the frozen text encoder behind its disk cache, and fixed-length token states.

Shared by the tokenizer (TexTok conditioning), the generator and the evals.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from tokenline.artifacts import read_jsonl
from tokenline.config import Params
from tokenline.text.embedding_cache import TextEmbeddingCache
from tokenline.text.encoder import TextEncoder, build_text_encoder

# Embeddings are computed in chunks so a large caption set never sits in memory at full width.
CHUNK = 512


def text_cache_dir(root: Path) -> Path:
    """The per-project caption embedding cache (keyed by encoder fingerprint; safe to delete)."""
    return Path(root) / "data" / ".text_cache"


def params_text_encoder(params: Params) -> TextEncoder:
    """The frozen text encoder params name (MiniLM offline by default; OpenCLIP by local path)."""
    p = params.tokenizer
    if p.text_encoder == "minilm":
        # +2 for [CLS] and [SEP]: text_tokens counts the positions the tokenizer keeps.
        return build_text_encoder("minilm", p.text_encoder_path, max_tokens=max(2, p.text_tokens))
    return build_text_encoder("openclip", p.text_encoder_path)


def cached_text_encoder(root: Path, params: Params) -> TextEmbeddingCache:
    """The params' frozen text encoder behind the project's per-caption embedding cache."""
    return TextEmbeddingCache(text_cache_dir(root), params_text_encoder(params))


def caption_map(captions_dir: Path) -> dict[str, str]:
    """Sample key -> caption from a captions stage output folder."""
    return {row["key"]: row["caption"] for row in read_jsonl(Path(captions_dir) / "captions.jsonl")}


def cut_or_pad(states: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Token states [B, T, D] and mask [B, T] cut or zero-padded to exactly `length` positions."""
    states, mask = states[:, :length], mask[:, :length].bool()
    missing = length - states.shape[1]
    if missing > 0:
        states = torch.nn.functional.pad(states, (0, 0, 0, missing))
        mask = torch.nn.functional.pad(mask, (0, missing))
    # Padded positions hold zeros whatever the encoder left there.
    return states * mask.unsqueeze(-1).to(states.dtype), mask


class CaptionTexts:
    """Every sample's caption tokens, encoded once through the disk cache; called with keys."""
    def __init__(self, captions: dict[str, str], encoder: TextEncoder, cache_dir: Path, length: int):
        self.cache = TextEmbeddingCache(cache_dir, encoder)
        self.length = length
        self.index = {key: row for row, key in enumerate(captions)}
        states, masks = [], []
        texts = list(captions.values())
        for start in tqdm(range(0, len(texts), CHUNK), desc="caption embeddings", unit="chunk"):
            encoding = self.cache.encode(texts[start : start + CHUNK])
            chunk_states, chunk_mask = cut_or_pad(encoding.tokens, encoding.mask, length)
            # float16 halves the table; the tokenizer's text projection runs in float32 anyway.
            states.append(chunk_states.to(torch.float16).cpu())
            masks.append(chunk_mask.cpu())
        width = encoder.token_dim
        self.states = torch.cat(states) if states else torch.zeros(0, length, width, dtype=torch.float16)
        self.masks = torch.cat(masks) if masks else torch.zeros(0, length, dtype=torch.bool)

    def __call__(self, keys: list[str]) -> tuple[Tensor, Tensor]:
        """(states [B, length, D] float32, mask [B, length] bool) of these samples' captions."""
        missing = [key for key in keys if key not in self.index]
        if missing:
            raise KeyError(f"no caption for sample keys {missing[:5]}; rerun the captions stage")
        rows = torch.tensor([self.index[key] for key in keys])
        return self.states[rows].float(), self.masks[rows]

    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(states, mask) for arbitrary captions, through the same cache and length."""
        encoding = self.cache.encode(list(captions))
        states, mask = cut_or_pad(encoding.tokens, encoding.mask, self.length)
        return states.float().cpu(), mask.cpu()
