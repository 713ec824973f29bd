"""A contact sheet: a grid of sample images, for MLflow artifacts and Dagster previews."""

from __future__ import annotations

import base64
import io
import math

from PIL import Image


def contact_sheet(images: list[Image.Image], cell: int = 64, background: str = "white") -> Image.Image:
    """Paste up to len(images) thumbnails into a near-square grid of `cell`-pixel cells."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * cell, rows * cell), background)
    for index, image in enumerate(images):
        thumb = image.convert("RGB")
        thumb.thumbnail((cell, cell), Image.Resampling.LANCZOS)
        x = (index % columns) * cell + (cell - thumb.width) // 2
        y = (index // columns) * cell + (cell - thumb.height) // 2
        sheet.paste(thumb, (x, y))
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    """Encode an image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def markdown_image(image: Image.Image, alt: str = "samples") -> str:
    """A markdown image with the PNG inlined as a data URI (Dagster renders it)."""
    encoded = base64.b64encode(png_bytes(image)).decode()
    return f"![{alt}](data:image/png;base64,{encoded})"
