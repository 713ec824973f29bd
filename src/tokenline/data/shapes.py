"""`shapes`: seeded synthetic scenes of 1-3 coloured shapes on white, for GenEval-style checks.

Every image holds 1-3 non-overlapping shapes, each a KINDS entry in one of the COLORS, "small"
or "large". Colours are distinct within an image (so each colour names one object) and are
drawn without anti-aliasing, so every shape pixel has exactly its COLORS value.

Caption grammar (the size word is always included):
    one shape:    "a large red circle"
    two shapes:   "a large red circle to the left of a small blue square"
    three shapes: "a large red circle to the left of a small blue square and
                   a small green triangle above the small blue square"
Relations are "to the left of", "to the right of", "above", "below"; each stated relation holds
between the shapes' centres by at least a quarter of the image side. The three-shape caption
always relates the first and the third shape to the second.

Metadata coordinates are pixels with x to the right and y down; a bbox [x0, y0, x1, y1] covers
pixels x0 <= x < x1 and y0 <= y < y1, and its centre is ((x0 + x1) / 2, (y0 + y1) / 2).
Record i depends only on (seed, i), so `records(n)` is a prefix of the full set.

Twins (`source: shapes:twins`): after each scene whose first two shapes can trade places (both
still inside the image, apart, and every stated relation still holding once the caption names
them the other way round), the source also yields that scene with the two exchanged, keyed
`<key>_twin`, its metadata naming the original in `twin_of`. Its caption is the original's with
the first two objects swapped: the same words, the opposite layout. A generator that must tell
the two apart learns which object the caption puts where (the swap term of generator training).
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Iterator

from PIL import Image, ImageDraw

from tokenline.data.records import Record

LICENSE = "CC0-1.0 (synthetic)"
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
# Saturated and pairwise far apart in RGB (closest pair about 127 apart), so a checker can
# assign each generated pixel to its nearest colour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 170, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 128, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
SIZES: dict[str, float] = {"small": 0.2, "large": 0.36}  # shape side as a fraction of the image
MIN_SIDE = 4  # pixels: below this a shape's kind cannot be seen
RELATION_WORDS: dict[str, str] = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}
MIN_SEPARATION = 0.25  # centres differ by this fraction of the side along a stated relation
MAX_ATTEMPTS = 1000


@dataclass(frozen=True)
class Shape:
    """One placed shape: bbox corners are exclusive at x1 and y1."""

    kind: str
    color: str
    size: str
    bbox: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the bbox in pixel coordinates."""
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    @property
    def phrase(self) -> str:
        """`large red circle`."""
        return f"{self.size} {self.color} {self.kind}"


def side_lengths(resolution: int) -> dict[str, int]:
    """Pixel side of each size at this resolution; large stays visibly larger than small."""
    small = max(MIN_SIDE, round(SIZES["small"] * resolution))
    large = max(math.ceil(small * 1.5), round(SIZES["large"] * resolution))
    return {"small": small, "large": large}


def relations_between(subject: Shape, obj: Shape, margin: float) -> list[str]:
    """Every relation of `subject` to `obj` that holds by at least `margin` pixels."""
    (sx, sy), (ox, oy) = subject.center, obj.center
    held = []
    if ox - sx >= margin:
        held.append("left_of")
    if sx - ox >= margin:
        held.append("right_of")
    if oy - sy >= margin:
        held.append("above")
    if sy - oy >= margin:
        held.append("below")
    return held


def overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    """Whether two bboxes come closer than `gap` pixels."""
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def blob_gap(resolution: int) -> int:
    """The fewest pixels between two shapes' boxes, so each is its own blob for the checker."""
    return max(1, resolution // 32)


def any_overlap(shapes: list[Shape], gap: int) -> bool:
    """Whether some two of `shapes` come closer than `gap` pixels."""
    return any(overlaps(a.bbox, b.bbox, gap) for i, a in enumerate(shapes) for b in shapes[i + 1 :])


def outline(kind: str, bbox: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    """Polygon of a pointed kind inside an inclusive pixel box."""
    x0, y0, x1, y1 = bbox[0], bbox[1], bbox[2] - 1, bbox[3] - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if kind == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if kind == "star":
        outer, inner = (x1 - x0) / 2, (x1 - x0) / 2 * 0.45
        points = []
        for step in range(10):
            radius = outer if step % 2 == 0 else inner
            angle = -math.pi / 2 + step * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"no outline for kind {kind!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    """Fill one shape in its exact colour (ImageDraw fills without anti-aliasing)."""
    fill = COLORS[shape.color]
    inclusive = (shape.bbox[0], shape.bbox[1], shape.bbox[2] - 1, shape.bbox[3] - 1)
    if shape.kind == "circle":
        draw.ellipse(inclusive, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(inclusive, fill=fill)
    else:
        draw.polygon(outline(shape.kind, shape.bbox), fill=fill)


def caption_for(shapes: list[Shape], relations: list[dict]) -> str:
    """The fixed-grammar caption of a scene (see the module docstring)."""
    if len(shapes) == 1:
        return f"a {shapes[0].phrase}"
    words = [RELATION_WORDS[r["relation"]] for r in relations]
    first = f"a {shapes[0].phrase} {words[0]} a {shapes[1].phrase}"
    if len(shapes) == 2:
        return first
    return f"{first} and a {shapes[2].phrase} {words[1]} the {shapes[1].phrase}"


def sample_scene(rng: random.Random, resolution: int) -> tuple[list[Shape], list[dict]]:
    """Place 1-3 shapes and choose relations that hold by a clear margin."""
    count = rng.randint(1, 3)
    sides = side_lengths(resolution)
    colors = rng.sample(sorted(COLORS), count)
    kinds = [rng.choice(KINDS) for _ in range(count)]
    sizes = [rng.choice(sorted(SIZES)) for _ in range(count)]
    margin = MIN_SEPARATION * resolution
    gap = blob_gap(resolution)
    for _ in range(MAX_ATTEMPTS):
        shapes: list[Shape] = []
        for kind, color, size in zip(kinds, colors, sizes):
            side = sides[size]
            x0, y0 = rng.randint(0, resolution - side), rng.randint(0, resolution - side)
            shapes.append(Shape(kind, color, size, (x0, y0, x0 + side, y0 + side)))
        if any_overlap(shapes, gap):
            continue
        relations = []
        for subject in (0, 2)[: count - 1]:
            held = relations_between(shapes[subject], shapes[1], margin)
            if not held:
                break
            relations.append({"subject": subject, "relation": rng.choice(held), "object": 1})
        else:
            return shapes, relations
    raise RuntimeError(f"could not place {count} shapes at {resolution} px in {MAX_ATTEMPTS} attempts")


def moved_to(shape: Shape, center: tuple[float, float]) -> Shape:
    """The same shape with its bbox centred on `center` (rounded to whole pixels)."""
    side = shape.bbox[2] - shape.bbox[0]
    x0, y0 = round(center[0] - side / 2), round(center[1] - side / 2)
    return Shape(shape.kind, shape.color, shape.size, (x0, y0, x0 + side, y0 + side))


def twin_scene(shapes: list[Shape], relations: list[dict], resolution: int) -> list[Shape] | None:
    """The first two shapes exchanged, listed in the twin caption's order, or None where the scene's rules break.

    The twin caption names the second shape first, so the result is [second moved to the first's
    centre, first moved to the second's, third]; `relations` then hold of it unchanged.
    """
    if len(shapes) < 2:
        return None
    first, second, *rest = shapes
    twin = [moved_to(second, first.center), moved_to(first, second.center), *rest]
    if any(min(s.bbox) < 0 or max(s.bbox) > resolution for s in twin):
        return None
    if any_overlap(twin, blob_gap(resolution)):
        return None
    margin = MIN_SEPARATION * resolution
    if any(r["relation"] not in relations_between(twin[r["subject"]], twin[r["object"]], margin) for r in relations):
        return None
    return twin


class ShapesSource:
    """`size` synthetic shape scenes at `resolution`, reproducible from `seed`; with `twins`, their swapped twins too."""

    def __init__(self, resolution: int, size: int, seed: int = 0, twins: bool = False):
        self.resolution = resolution
        self.size = size
        self.seed = seed
        self.twins = twins

    def scene(self, index: int) -> tuple[list[Shape], list[dict]]:
        """The shapes and relations of scene `index`; they depend only on (seed, index)."""
        return sample_scene(random.Random(f"{self.seed}-{index}"), self.resolution)

    def record(self, index: int) -> Record:
        """The scene at `index`."""
        shapes, relations = self.scene(index)
        return self._record(f"shapes_{index:06d}", index, shapes, relations, {})

    def twin_record(self, index: int) -> Record | None:
        """Scene `index` with its first two shapes exchanged, or None where they cannot trade places."""
        shapes, relations = self.scene(index)
        twin = twin_scene(shapes, relations, self.resolution)
        if twin is None:
            return None
        return self._record(f"shapes_{index:06d}_twin", index, twin, relations, {"twin_of": f"shapes_{index:06d}"})

    def _record(self, key: str, index: int, shapes: list[Shape], relations: list[dict], extra: dict) -> Record:
        image = Image.new("RGB", (self.resolution, self.resolution), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for shape in shapes:
            draw_shape(draw, shape)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return Record(
            key=key,
            image=buffer.getvalue(),
            image_ext="png",
            caption=caption_for(shapes, relations),
            metadata={
                "source": "shapes",
                "license": LICENSE,
                "seed": self.seed,
                "index": index,
                "count": len(shapes),
                "objects": [
                    {"kind": s.kind, "color": s.color, "size": s.size, "center": list(s.center), "bbox": list(s.bbox)}
                    for s in shapes
                ],
                "relations": relations,
                **extra,
            },
        )

    def records(self, limit: int | None = None) -> Iterator[Record]:
        """Yield scene 0 (and its twin), scene 1, ... : `size` scenes, at most `limit` records."""
        yielded = 0
        for index in range(self.size):
            for record in (self.record(index), self.twin_record(index) if self.twins else None):
                if record is None:
                    continue
                if limit is not None and yielded >= limit:
                    return
                yield record
                yielded += 1

    def describe(self) -> dict:
        """Size, seed, twins, kinds and colours."""
        described = {"name": "shapes", "size": self.size, "seed": self.seed, "kinds": list(KINDS), "colors": list(COLORS)}
        if self.twins:
            described["twins"] = True
        return described
