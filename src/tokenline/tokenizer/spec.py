"""From params to a TokenizerConfig: the one place that decides what tokenizer a profile trains."""

from __future__ import annotations

from typing import Any

from tokenline.config import Params
from tokenline.tokenizer.model import SIZE_DEFAULTS, TokenizerConfig


def _check_buildable(values: dict[str, Any], section: str, p) -> None:
    """ValueError naming the params section when `values` cannot make a TokenizerConfig."""
    try:
        TokenizerConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{section} (size {p.size}, model {p.model}): {error}") from None


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
        _check_buildable(values, "tokenizer", p)
    return values


def tokenizer_config(params: Params, text_dim: int) -> TokenizerConfig:
    """The TokenizerConfig that params describe, given the text encoder's token width."""
    return TokenizerConfig.from_dict(tokenizer_config_values(params, text_dim))


def teacher_config_values(params: Params, check: bool = False) -> dict[str, Any]:
    """TokenizerConfig fields of the grid teacher (teacher_tokenizer): the named size, then its model, then the grid.

    With `check`, build the config so a patch that does not divide the resolution (or any other
    impossible combination) raises ValueError naming `teacher_tokenizer`.
    """
    p = params.teacher_tokenizer
    values = {**SIZE_DEFAULTS[p.size], **p.model, "image_size": params.data.resolution, "quantizer": p.quantizer,
              "layout": "grid", "text_dim": 0}
    patch = values.get("patch_size", TokenizerConfig.patch_size)
    values["num_tokens"] = (params.data.resolution // patch) ** 2
    if check:
        _check_buildable(values, "teacher_tokenizer", p)
    return values


def teacher_config(params: Params) -> TokenizerConfig:
    """The grid teacher's TokenizerConfig that params describe."""
    return TokenizerConfig.from_dict(teacher_config_values(params))


def check_two_stage_params(params: Params) -> None:
    """ValueError unless the teacher and the 1D tokenizer fit (same patch grid) when proxy training is on."""
    teacher = teacher_config_values(params, check=True)
    if not params.tokenizer.train.proxy_steps:
        return
    student = tokenizer_config_values(params, text_dim=0)
    if student.get("layout", "1d") == "grid":
        raise ValueError("tokenizer.train.proxy_steps > 0 trains a 1D tokenizer against the grid teacher: "
                         "tokenizer.model.layout must be '1d' or '1d-mix'")
    if student.get("patch_size", TokenizerConfig.patch_size) != teacher.get("patch_size", TokenizerConfig.patch_size):
        raise ValueError(f"tokenizer.model.patch_size {student.get('patch_size', TokenizerConfig.patch_size)} and "
                         f"teacher_tokenizer.model.patch_size {teacher.get('patch_size', TokenizerConfig.patch_size)} "
                         "must match: the 1D decoder predicts one teacher latent per patch")
