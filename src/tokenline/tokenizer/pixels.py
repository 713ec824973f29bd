"""The tokenizer's pixel convention in one place: PIL RGB <-> float tensors in [-1, 1]."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def image_to_tensor(image: Image.Image) -> Tensor:
    """PIL image -> float32 [3, H, W] in [-1, 1] (the mapping training, caching and eval share)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1.0


def samples_to_batch(samples: list[dict], image_size: int) -> Tensor:
    """Shard samples' images -> float32 [B, 3, S, S]; an image of another size is an error naming its key."""
    for sample in samples:
        width, height = sample["image"].size
        if (width, height) != (image_size, image_size):
            raise ValueError(
                f"sample {sample['key']!r} is {width}x{height} pixels but the tokenizer "
                f"takes {image_size}x{image_size}: re-run the shards stage at the tokenizer's resolution"
            )
    return torch.stack([image_to_tensor(sample["image"]) for sample in samples])


def tensor_to_image(image: Tensor) -> Image.Image:
    """Float [3, H, W] in [-1, 1] -> PIL RGB (values outside are clipped, as a saved image would be)."""
    unit = ((image.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    return Image.fromarray((unit * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy())


def batched(items: Iterable, size: int, limit: int | None = None) -> Iterator[list]:
    """Lists of up to `size` items, `limit` items in all (None: every item)."""
    batch: list = []
    for seen, item in enumerate(items):
        if limit is not None and seen >= limit:
            break
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
