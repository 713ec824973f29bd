"""A contact sheet: a grid of sample images, for MLflow artifacts and Dagster previews."""

from __future__ import annotations

import base64
import io
import math

from PIL import Image, ImageDraw, ImageFont, ImageOps


CAPTION_LINES = 3  # caption lines under each cell; longer captions end in "…"


def contact_sheet(images: list[Image.Image], cell: int = 64, gutter: str = "#c8c8c8",
                  captions: list[str] | None = None) -> Image.Image:
    """Paste thumbnails into a near-square grid of `cell`-pixel cells with a thin gutter; each captioned below when `captions` are given."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"contact_sheet got {len(images)} images but {len(captions)} captions")
    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + 2
    text_height = CAPTION_LINES * line_height if captions else 0
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = cell, cell + text_height
    # White images on a white sheet would run together: a 1-pixel gutter frames each cell.
    sheet = Image.new("RGB", (columns * width + 1, rows * height + 1), gutter)
    draw = ImageDraw.Draw(sheet)
    for index, image in enumerate(images):
        left, top = (index % columns) * width + 1, (index // columns) * height + 1
        thumb = ImageOps.pad(image.convert("RGB"), (cell - 1, cell - 1), Image.Resampling.LANCZOS, color="white")
        sheet.paste(thumb, (left, top))
        if captions:
            draw.rectangle((left, top + cell - 1, left + width - 2, top + height - 2), fill="white")
            for line, text in enumerate(_caption_lines(captions[index], font, cell - 4)):
                draw.text((left + 2, top + cell + line * line_height), text, fill="#222222", font=font)
    return sheet


def _caption_lines(caption: str, font, width: int) -> list[str]:
    """The caption wrapped into at most CAPTION_LINES lines of `width` pixels, the last cut with "…"."""
    lines, current = [], ""
    for word in caption.split():
        candidate = f"{current} {word}".strip()
        if font.getlength(candidate) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    lines.append(current)
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] += " …"
    while lines and font.getlength(lines[-1]) > width:  # one long word, or the added ellipsis
        lines[-1] = lines[-1][:-2] + "…"
    return lines


def png_bytes(image: Image.Image) -> bytes:
    """Encode an image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def markdown_image(image: Image.Image, alt: str = "samples") -> str:
    """A markdown image with the PNG inlined as a data URI (Dagster renders it)."""
    encoded = base64.b64encode(png_bytes(image)).decode()
    return f"![{alt}](data:image/png;base64,{encoded})"
