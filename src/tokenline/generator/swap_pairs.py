"""Pair token-cache rows with a row captioned by their caption's swap, the swap term's negatives.

Only swaps that are themselves captions of the cache count. A made-up swap would be a caption
the data never shows, and the generator learns to spot made-up captions instead of where the
caption puts each object (README, shapes). The shapes source's twins make every two-object
training scene's swap a real caption of a real scene.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from tokenline.data.shapes_captions import swapped_caption


def swap_partners(captions: Sequence[str], swap: Callable[[str], str | None] | None = None) -> Tensor:
    """For each caption, the first row holding its swap, or -1 where no row does: int64 [len(captions)]."""
    swap = swap or swapped_caption
    first_row: dict[str, int] = {}
    for row, caption in enumerate(captions):
        first_row.setdefault(caption, row)
    partners = [first_row.get(swapped, -1) if (swapped := swap(caption)) is not None else -1 for caption in captions]
    return torch.tensor(partners, dtype=torch.long)


def require_partners(partners: Tensor, where: str) -> None:
    """Refuse a swap-term run with nothing to contrast, naming the cache and the fix."""
    if int((partners >= 0).sum()) == 0:
        raise ValueError(
            f"generator.train.swap_weight > 0 needs captions whose swap (first two objects exchanged) is also "
            f"a caption of the training split, and the token cache at {where} has none; use a shapes dataset "
            f"with `source: shapes:twins`, or set swap_weight 0"
        )
