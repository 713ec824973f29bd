"""A folder of hostile inputs, one per case the importer must survive (see test_bad_input)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _noise(seed: int, size=(48, 48), mode="RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + end


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (40, 40), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, 20, 40))  # left half blue, right half palette index 0 (transparent)
    return _encode(image, "PNG", transparency=0)


def _sixteen_bit_gray() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 40, dtype=np.uint16), (40, 1))
    return _encode(Image.fromarray(ramp), "PNG")


def _rgba_half_transparent() -> bytes:
    pixels = np.zeros((40, 40, 4), dtype=np.uint8)
    pixels[:, :20] = (0, 128, 0, 255)  # opaque green left half; right half fully transparent
    return _encode(Image.fromarray(pixels), "PNG")


# name -> (image files {filename: bytes}, caption bytes or None)
def build_cases() -> dict[str, tuple[dict[str, bytes], bytes | None]]:
    """Every hostile case: the files it consists of and its caption."""
    good = b"a perfectly fine caption"
    valid_png = _encode(_noise(1), "PNG")
    valid_jpeg = _encode(_noise(2), "JPEG", quality=90)
    twin = _encode(_noise(3), "PNG")
    return {
        "zero_byte": ({"zero_byte.png": b""}, good),
        "truncated_png": ({"truncated_png.png": valid_png[: len(valid_png) // 2]}, good),
        "truncated_jpeg": ({"truncated_jpeg.jpg": valid_jpeg[: len(valid_jpeg) // 2]}, good),
        "text_as_jpg": ({"text_as_jpg.jpg": b"this is plain text, not a JPEG\n" * 20}, good),
        "cmyk_jpeg": ({"cmyk_jpeg.jpg": _encode(_noise(4, mode="CMYK"), "JPEG")}, good),
        "png_16bit": ({"png_16bit.png": _sixteen_bit_gray()}, good),
        "palette_transparency": ({"palette_transparency.png": _palette_with_transparency()}, good),
        "grayscale": ({"grayscale.png": _encode(_noise(5, mode="L"), "PNG")}, good),
        "rgba": ({"rgba.png": _rgba_half_transparent()}, good),
        "webp": ({"webp.webp": _encode(_noise(6), "WEBP", lossless=True)}, good),
        "huge_header": ({"huge_header.png": _png_header_only(30000, 30000)}, good),
        "few_pixels_wide": ({"few_pixels_wide.png": _encode(_noise(7, size=(3, 64)), "PNG")}, good),
        "extreme_aspect": ({"extreme_aspect.png": _encode(_noise(8, size=(400, 40)), "PNG")}, good),
        "missing_caption": ({"missing_caption.png": _encode(_noise(9), "PNG")}, None),
        "whitespace_caption": ({"whitespace_caption.png": _encode(_noise(10), "PNG")}, b"  \t\n  "),
        "non_utf8_caption": ({"non_utf8_caption.png": _encode(_noise(11), "PNG")}, b"caf\xe9 au lait"),
        "long_caption": ({"long_caption.png": _encode(_noise(12), "PNG")}, b"x" * 10_000),
        "identical_images": ({"identical_a.png": twin, "identical_b.png": twin}, None),
        "caption_without_image": ({}, good),
        "shared_stem": ({"shared_stem.png": _encode(_noise(13), "PNG"), "shared_stem.jpg": _encode(_noise(14), "JPEG")}, good),
        "messy_caption": ({"messy_caption.png": _encode(_noise(15), "PNG")}, "\ufeff  Caf\u0065\u0301\x07 on\n\ntwo   lines ".encode()),
    }


def write_cases(folder: Path) -> dict[str, tuple[dict[str, bytes], bytes | None]]:
    """Write every case into `folder`; identical images each get their own caption file."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = build_cases()
    for name, (files, caption) in cases.items():
        for filename, data in files.items():
            (folder / filename).write_bytes(data)
            if name == "identical_images":
                (folder / filename).with_suffix(".txt").write_bytes(b"one of two identical images")
        if caption is not None and name != "identical_images":
            (folder / f"{name}.txt").write_bytes(caption)
    return cases
