"""A contact sheet: a grid of sample images, for MLflow artifacts and Dagster previews."""

from __future__ import annotations

import base64
import io
import math

from PIL import Image, ImageOps


def contact_sheet(images: list[Image.Image], cell: int = 64, gutter: str = "#c8c8c8") -> Image.Image:
    """Paste thumbnails into a near-square grid of `cell`-pixel cells with a thin gutter."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    # White images on a white sheet would run together: a 1-pixel gutter frames each cell.
    sheet = Image.new("RGB", (columns * cell + 1, rows * cell + 1), gutter)
    for index, image in enumerate(images):
        thumb = ImageOps.pad(image.convert("RGB"), (cell - 1, cell - 1), Image.Resampling.LANCZOS, color="white")
        sheet.paste(thumb, ((index % columns) * cell + 1, (index // columns) * cell + 1))
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
