"""The probe stage's contact sheet: each real image with the caption the probe ranks first."""

from __future__ import annotations

import torch

from tokenline.tokenizer.pixels import samples_to_batch


@torch.no_grad()
def retrieval_previews(model, samples: list[dict], encoder, size: int) -> list[tuple]:
    """(image, the caption the probe ranks first among these samples' captions) for the contact sheet."""
    if not samples:
        return []
    captions = [s["caption"] for s in samples]
    images = model.encode_images(samples_to_batch(samples, size))
    texts = model.encode_texts(encoder.encode(captions).pooled.float())
    best = (images @ texts.T).argmax(dim=1).tolist()
    return [(s["image"], ("= " if captions[b] == s["caption"] else "≠ ") + captions[b]) for s, b in zip(samples, best)]
