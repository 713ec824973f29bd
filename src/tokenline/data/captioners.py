"""Captioners: one interface, three kinds (metadata, template, model)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from PIL import Image

from tokenline.config import CaptionParams
from tokenline.data.caption_policy import normalize_caption


class Captioner(Protocol):
    """Writes one caption per sample."""

    name: str

    def caption(self, key: str, image: Image.Image, source_caption: str, metadata: dict) -> str:
        """The caption for one sample."""
        ...

    def describe(self) -> dict:
        """What produced the captions, for manifests and the captions file."""
        ...


class MetadataCaptioner:
    """The source's own caption, normalized."""

    name = "metadata"

    def caption(self, key: str, image: Image.Image, source_caption: str, metadata: dict) -> str:
        """Normalize the source caption."""
        return normalize_caption(source_caption)

    def describe(self) -> dict:
        """Kind only."""
        return {"captioner": self.name}


class TemplateCaptioner:
    """A caption composed from metadata fields with str.format (`{caption}` is the source's)."""

    name = "template"

    def __init__(self, template: str):
        self.template = template

    def caption(self, key: str, image: Image.Image, source_caption: str, metadata: dict) -> str:
        """Fill the template; a field the record lacks is an error naming it and the key."""
        fields = {**metadata, "caption": source_caption, "key": key}
        try:
            return normalize_caption(self.template.format_map(fields))
        except (KeyError, IndexError) as error:
            raise ValueError(
                f"captions.template {self.template!r} uses field {error} which sample {key!r} lacks "
                f"(fields: {', '.join(sorted(fields))})"
            ) from None

    def describe(self) -> dict:
        """Kind and template."""
        return {"captioner": self.name, "template": self.template}


class ModelCaptioner:
    """An image-to-text model from a local path or hub name (GPU boxes; `captioning` extra)."""

    name = "model"

    def __init__(self, model: str, max_new_tokens: int):
        self.model = model
        self.max_new_tokens = max_new_tokens
        self._pipeline = None

    def _load(self):
        # An explicit path (/, ./, ~) must exist: never fall through to a hub lookup. A bare
        # `org/name` is a hub name, for GPU boxes with network.
        if self.model.startswith((".", "/", "~")) and not Path(self.model).expanduser().exists():
            raise FileNotFoundError(f"captions.model: local model folder {self.model} does not exist")
        try:
            from transformers import pipeline
        except ImportError as error:
            raise RuntimeError("the model captioner needs transformers: pip install -e '.[captioning]'") from error
        import torch

        device = 0 if torch.cuda.is_available() else -1
        return pipeline("image-to-text", model=self.model, device=device)

    def caption(self, key: str, image: Image.Image, source_caption: str, metadata: dict) -> str:
        """Generate a caption for the image."""
        if self._pipeline is None:
            self._pipeline = self._load()
        output = self._pipeline(image, generate_kwargs={"max_new_tokens": self.max_new_tokens})
        return normalize_caption(output[0]["generated_text"])

    def describe(self) -> dict:
        """Kind, model and generation length."""
        return {"captioner": self.name, "model": self.model, "max_new_tokens": self.max_new_tokens}


def build_captioner(params: CaptionParams) -> Captioner:
    """The captioner params name."""
    if params.captioner == "metadata":
        return MetadataCaptioner()
    if params.captioner == "template":
        return TemplateCaptioner(params.template)
    return ModelCaptioner(params.model, params.max_new_tokens)
