"""The pair cache: the teacher's samples for train captions, drawn once per (teacher, sampling) and reused.

reflow trains on (noise, the teacher's ODE endpoint from that noise) pairs and mask_distill on the
teacher's decoded codes; drawing them is the expensive part of both, so they are kept in the
student's work folder as an artifact of their own:

    <folder>/pairs.safetensors  rows [N] int64: the train-cache rows whose captions were used;
                                flow: noise [N, K, D] and endpoint [N, K, D] (the endpoint in the
                                flow's standardized space, before denormalize), float32;
                                masked: codes [N, K] int64
    <folder>/meta.json          written last: teacher_hash, sampling, count, seed, objective

A cache is used only with the teacher (content hash) and sampling it was drawn with: another
teacher's cache is refused naming both hashes (`PairCacheMismatch`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor
from tqdm import tqdm

from tokenline.artifacts import atomic_dir, atomic_write_json
from tokenline.distill.teacher import Teacher
from tokenline.generator.generate import flow_endpoint, sample_tokens
from tokenline.generator.model import FlowTransformer
from tokenline.generator.train import text_batch
from tokenline.tokenizer.token_cache import TokenCache

logger = logging.getLogger(__name__)

TENSORS = "pairs.safetensors"
META = "meta.json"


class PairCacheMismatch(ValueError):
    """A pair cache drawn from another teacher (or with other sampling) than the one asked for."""


def pair_rows(cache_size: int, count: int, seed: int) -> Tensor:
    """`count` train-cache rows: a seeded permutation, repeated when count exceeds the cache."""
    order = torch.randperm(cache_size, generator=torch.Generator().manual_seed(seed))
    return order.repeat((count + cache_size - 1) // cache_size)[:count]


@torch.no_grad()
def draw_pairs(teacher: Teacher, cache: TokenCache, count: int, seed: int, batch_size: int = 64) -> dict[str, Tensor]:
    """The teacher's samples for `count` train captions: noise and ODE endpoints (flow) or codes (masked)."""
    rows = pair_rows(len(cache), count, seed)
    model, config = teacher.model, teacher.model.config
    parts: dict[str, list[Tensor]] = {}
    for start in tqdm(range(0, count, batch_size), desc="teacher pairs", unit="batch"):
        index = rows[start : start + batch_size]
        text = text_batch(cache.rows(index.tolist()))
        options = replace(teacher.sampling, seed=seed * 1_000_003 + start)
        if isinstance(model, FlowTransformer):
            generator = torch.Generator().manual_seed(options.seed)
            noise = torch.randn(len(index), config.num_tokens, config.token_dim, generator=generator)
            endpoint, _ = flow_endpoint(model, text, options, None, generator, noise)
            drawn = {"noise": noise, "endpoint": endpoint.float()}
        else:
            codes, _ = sample_tokens(model, text, options)
            drawn = {"codes": codes.long()}
        for name, value in drawn.items():
            parts.setdefault(name, []).append(value)
    return {"rows": rows, **{name: torch.cat(values) for name, values in parts.items()}}


def expected_meta(teacher: Teacher, count: int, seed: int) -> dict[str, Any]:
    """What a cache drawn for this teacher, sampling, count and seed says of itself."""
    return {"teacher_hash": teacher.content_hash, "sampling": teacher.sampling.describe(), "count": count,
            "seed": seed, "objective": teacher.model.config.objective}


def write_pairs(folder: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write the tensors, then meta.json, into a fresh folder that replaces `folder` whole."""
    with atomic_dir(folder) as temp:
        safetensors.torch.save_file({name: t.contiguous() for name, t in tensors.items()}, temp / TENSORS)
        atomic_write_json(temp / META, meta)


def read_pairs(folder: Path, expected: dict[str, Any]) -> dict[str, Tensor]:
    """The cache in `folder` if it was drawn as `expected` says; PairCacheMismatch naming the difference otherwise."""
    meta_path = Path(folder) / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no complete pair cache ({META} missing)")
    found = json.loads(meta_path.read_text())
    if found.get("teacher_hash") != expected["teacher_hash"]:
        raise PairCacheMismatch(f"the pair cache {folder} was drawn from teacher {found.get('teacher_hash')}, "
                                f"not from this teacher {expected['teacher_hash']}")
    differing = sorted(key for key in expected if found.get(key) != expected[key])
    if differing:
        raise PairCacheMismatch(f"the pair cache {folder} was drawn with other {', '.join(differing)} "
                                f"({ {k: found.get(k) for k in differing} } vs { {k: expected[k] for k in differing} })")
    return safetensors.torch.load_file(Path(folder) / TENSORS)


def ensure_pairs(folder: Path, teacher: Teacher, cache: TokenCache, count: int, seed: int,
                 resume: bool = False) -> dict[str, Tensor]:
    """The pair cache for this teacher: read when it matches, else drawn and written.

    A resumed student trained on the cache in `folder`, so there a mismatch is an error; a fresh
    run replaces a cache drawn for another teacher or sampling.
    """
    expected = expected_meta(teacher, count, seed)
    try:
        return read_pairs(folder, expected)
    except FileNotFoundError:
        pass
    except PairCacheMismatch as mismatch:
        if resume:
            raise
        logger.info("%s; drawing it again", mismatch)
    tensors = draw_pairs(teacher, cache, count, seed)
    write_pairs(folder, tensors, expected)
    return tensors


class PairSet:
    """Pairs joined to their captions, read like a token cache split (`rows`, `len`), for `cache_batches`."""

    def __init__(self, pairs: dict[str, Tensor], cache: TokenCache, folder: Path):
        self.pairs, self.cache, self.folder, self.split = pairs, cache, folder, "pairs"

    def __len__(self) -> int:
        """Pairs in the set."""
        return len(self.pairs["rows"])

    def rows(self, indices) -> dict[str, Tensor]:
        """Pairs `indices` with their captions' text tensors."""
        index = torch.as_tensor(indices, dtype=torch.long)
        text = self.cache.rows(self.pairs["rows"][index].tolist())
        # The teacher's codes (masked pairs) replace the cache's data codes under the same key.
        return {**text, **{name: t[index] for name, t in self.pairs.items() if name != "rows"}, "index": index}
