"""Prompt cleaning, shared by the torch generator and the torch-free ONNX runtime.

Prompts are user input, so they are made safe before they reach a text encoder: control and
format characters become spaces, runs of white space collapse, and very long prompts are cut
(the text encoder keeps far fewer tokens anyway). An empty prompt, or one that is empty once
cleaned, asks for an unconditional sample. Pure Python: importing it pulls in no torch.
"""

from __future__ import annotations

import re
import unicodedata

MAX_PROMPT_CHARS = 4096  # longer prompts are cut before tokenization (the encoder keeps far fewer tokens)


def clean_prompt(prompt: str) -> str:
    """The prompt with control/format characters as spaces, white space collapsed, cut to MAX_PROMPT_CHARS."""
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    spaced = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Cs") else ch for ch in prompt[:MAX_PROMPT_CHARS])
    return re.sub(r"\s+", " ", spaced).strip()
