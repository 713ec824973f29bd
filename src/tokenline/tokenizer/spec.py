"""From params to a TokenizerConfig: the one place that decides what tokenizer a profile trains."""

from __future__ import annotations

from typing import Any

from tokenline.config import Params
from tokenline.tokenizer.model import SIZE_DEFAULTS, TokenizerConfig


def tokenizer_config_values(params: Params, text_dim: int, check: bool = False) -> dict[str, Any]:
    """TokenizerConfig fields for params: the named size, then tokenizer.model, then the set-elsewhere ones.

    With `check`, build the config so an impossible combination (a patch that does not divide
    the resolution, heads that do not divide the width, an unknown field) raises ValueError
    naming `tokenizer`.
    """

    p = params.tokenizer
    values = {
        **SIZE_DEFAULTS[p.size],
        **p.model,
        "image_size": params.data.resolution,
        "num_tokens": p.num_tokens,
        "quantizer": p.quantizer,
        "text_dim": text_dim if p.text_conditioning else 0,
        "text_tokens": p.text_tokens,
    }
    if check:
        try:
            TokenizerConfig.from_dict(values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"tokenizer (size {p.size}, model {p.model}): {error}") from None
    return values


def tokenizer_config(params: Params, text_dim: int) -> TokenizerConfig:
    """The TokenizerConfig that params describe, given the text encoder's token width."""
    return TokenizerConfig.from_dict(tokenizer_config_values(params, text_dim))
