"""Frozen text encoders: offline MiniLM by default, OpenCLIP by path."""

from tokenline.text.embedding_cache import TextEmbeddingCache
from tokenline.text.encoder import (
    ENCODER_KINDS,
    MiniLMEncoder,
    OpenCLIPTextEncoder,
    TextEncoder,
    TextEncoding,
    build_text_encoder,
    default_minilm_path,
)

__all__ = [
    "ENCODER_KINDS",
    "MiniLMEncoder",
    "OpenCLIPTextEncoder",
    "TextEmbeddingCache",
    "TextEncoder",
    "TextEncoding",
    "build_text_encoder",
    "default_minilm_path",
]
