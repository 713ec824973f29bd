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
