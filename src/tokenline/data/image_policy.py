"""How an offered image file is inspected, decoded and normalized (the documented policy).

Normalization of an accepted image, in order:
1. EXIF orientation applied;
2. 16-bit and float images scaled to 8 bits by their range;
3. palette images with transparency, LA and RGBA composited on white; CMYK, grayscale and
   other modes converted to RGB;
4. for shards: centre-cropped to a square and resized with Lanczos to the profile resolution.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


@dataclass
class ImageInspection:
    """What validation learns from an image file; later fields stay None after a failure."""

    file_bytes: int
    header_ok: bool | None = None  # Pillow identified a format
    format: str | None = None
    width: int | None = None
    height: int | None = None
    decoded: bool | None = None  # pixels decoded (only tried within the size bound)
    error: str | None = None
    image: Image.Image | None = None  # normalized RGB, when decoded
    pixel_hash: str | None = None  # of the normalized pixels: finds duplicates across formats

    @property
    def max_side(self) -> int | None:
        """The longer side from the header."""
        return max(self.width, self.height) if self.width is not None else None

    @property
    def min_side(self) -> int | None:
        """The shorter side, only for decoded images."""
        return min(self.width, self.height) if self.decoded else None

    @property
    def aspect(self) -> float | None:
        """Long side over short side, only for decoded images."""
        if not self.decoded:
            return None
        return max(self.width, self.height) / max(1, min(self.width, self.height))


@contextlib.contextmanager
def _header_only_bomb_check():
    # Pillow refuses huge headers at open time; we want to read the size and reject it
    # ourselves (before any decoding), so the bomb check is lifted just for the open.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def to_rgb_on_white(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if pixels.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def inspect_image(data: bytes, max_side: int) -> ImageInspection:
    """Identify, size-check, decode and normalize one image file's bytes."""
    report = ImageInspection(file_bytes=len(data))
    if not data:
        report.error = "zero bytes"
        return report
    try:
        with _header_only_bomb_check():
            image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        report.header_ok = False
        report.error = f"not an image: {error}"
        return report
    report.header_ok = True
    report.format = image.format
    report.width, report.height = image.size
    if report.max_side > max_side:
        report.error = f"header claims {report.width}x{report.height}"
        return report
    try:
        image.load()
        rgb = to_rgb_on_white(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        report.decoded = False
        report.error = f"decode failed: {error}"
        return report
    report.decoded = True
    report.width, report.height = rgb.size  # after EXIF rotation
    report.image = rgb
    report.pixel_hash = hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
    return report


def square_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Centre-crop to a square and resize to `resolution` pixels a side."""
    return ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS)
