"""Contact sheets: a framed grid that keeps each sample's aspect ratio."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tokenline.contact_sheet import contact_sheet


def test_grid_shape_and_gutter():
    sheet = contact_sheet([Image.new("RGB", (32, 32), "red")] * 5, cell=10)
    assert sheet.size == (3 * 10 + 1, 2 * 10 + 1)  # 5 images: 3 columns, 2 rows
    pixels = np.asarray(sheet)
    assert tuple(pixels[0, 0]) == (200, 200, 200) and tuple(pixels[5, 5]) == (255, 0, 0)
    assert tuple(pixels[15, 25]) == (200, 200, 200)  # the empty sixth cell shows the gutter colour


def test_wide_images_are_padded_not_stretched():
    wide = Image.new("RGB", (40, 10), "blue")
    pixels = np.asarray(contact_sheet([wide], cell=41))
    assert tuple(pixels[2, 20]) == (255, 255, 255) and tuple(pixels[20, 20]) == (0, 0, 255)


def test_empty_list_is_an_error():
    with pytest.raises(ValueError, match="at least one image"):
        contact_sheet([])


def test_captions_are_drawn_under_their_cells():
    """Generated samples carry their prompts, so a person can judge them against their captions."""
    images = [Image.new("RGB", (32, 32), "red")] * 2
    plain = contact_sheet(images, cell=40)
    captioned = contact_sheet(images, cell=40, captions=["a red circle", ""])
    assert captioned.size[0] == plain.size[0] and captioned.size[1] > plain.size[1]
    pixels = np.asarray(captioned)
    below_first, below_second = pixels[42:captioned.size[1] - 1, 1:40], pixels[42:captioned.size[1] - 1, 41:80]
    assert (below_first < 128).any(), "the first caption has dark text"
    assert (below_second == 255).all(), "an empty caption leaves its strip white"
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        contact_sheet(images, captions=["one"])
