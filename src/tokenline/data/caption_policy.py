"""How a raw caption is decoded and normalized (the documented policy).

Decoding: bytes must be UTF-8 (a leading byte-order mark is dropped); other bytes are
rejected as `caption_not_utf8` rather than guessed at. Normalization: Unicode NFC, control
characters (and line or paragraph separators) become spaces, runs of white space collapse to one space, ends trimmed.
"""

from __future__ import annotations

import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")


def decode_caption(raw: bytes | str | None) -> tuple[str | None, str]:
    """Return (text, state) with state `ok`, `missing` or `not_utf8`."""
    if raw is None:
        return None, "missing"
    if isinstance(raw, str):
        return raw, "ok"
    try:
        return raw.decode("utf-8-sig"), "ok"
    except UnicodeDecodeError:
        return None, "not_utf8"


def normalize_caption(text: str) -> str:
    """NFC, control characters to spaces, white space collapsed and trimmed."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text)
    return _WHITESPACE.sub(" ", text).strip()
