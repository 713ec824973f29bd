"""From params and a token cache to a GeneratorConfig: the one place that decides what generator a profile trains."""

from __future__ import annotations

from typing import Any

from tokenline.config import Params
from tokenline.generator.model import SIZE_DEFAULTS, GeneratorConfig


def objective_for(params: Params, quantizer: str) -> str:
    """flow or masked: `generator.objective`, where auto means masked for vq codes and flow otherwise."""
    chosen = params.generator.objective
    if chosen == "auto":
        return "masked" if quantizer == "vq" else "flow"
    if chosen == "masked" and quantizer not in ("vq", "softvq"):
        raise ValueError(f"generator.objective masked needs codebook codes; tokenizer.quantizer is {quantizer!r}")
    return chosen


def generator_config_values(params: Params, cache_meta: dict[str, Any]) -> dict[str, Any]:
    """GeneratorConfig fields: the named size, generator.model, then what the token cache fixes."""
    p = params.generator
    quantizer = cache_meta["quantizer"]
    return {
        **SIZE_DEFAULTS[p.size],
        **p.model,
        "objective": objective_for(params, quantizer),
        "text_mode": p.text_mode,
        "num_tokens": cache_meta["num_tokens"],
        "token_dim": cache_meta["token_dim"],
        "codebook_size": cache_meta.get("codebook_size") or 0,
        "text_dim": cache_meta["text_dim"],
        "text_pooled_dim": cache_meta["text_pooled_dim"],
        "text_tokens": cache_meta["text_tokens"],
        "binary": quantizer == "binary",
        "quantizer": quantizer,
        "tokenizer_hash": cache_meta["tokenizer_hash"],
    }


def check_generator_params(params: Params) -> None:
    """Build a config from params with the tokenizer's shapes, so a bad size or head count fails by name."""
    t = params.tokenizer
    meta = {
        "quantizer": t.quantizer, "num_tokens": t.num_tokens, "token_dim": 1, "codebook_size": 2,
        "text_dim": 1, "text_pooled_dim": 1, "text_tokens": t.text_tokens, "tokenizer_hash": "",
    }
    try:
        GeneratorConfig.from_dict(generator_config_values(params, meta))
    except (TypeError, ValueError) as error:
        raise ValueError(f"generator (size {params.generator.size}, model {params.generator.model}): {error}") from None
