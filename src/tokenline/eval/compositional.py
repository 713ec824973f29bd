"""GenEval-style compositional checks of generated `shapes` images against their captions.

A caption of the `shapes` grammar (see ``tokenline.data.shapes``) names 1-3 objects, each a size, a
colour and a kind, and 0-2 spatial relations between them. This module finds the coloured objects in
an image with fixed rules (numpy only, no learned detector) and reports, per image and over a set,
whether the named colours, kinds, object count and relations are there.

Detection
    Colour segmentation: a generated pixel is modelled as a mix of the white background and one
    ``shapes.COLORS`` entry, white + coverage * (colour - white), plus noise. Blur makes exactly such
    mixes at every edge, so each pixel goes to the colour whose white-to-colour line in RGB passes
    closest, and belongs to it when its coverage along that line is at least ``MIN_COVERAGE`` (0.5).
    A blurred straight edge crosses half coverage where the sharp edge was, so the masks keep their
    size under blur instead of shrinking the way a plain nearest-colour rule with a distance cap
    shrinks them (that rule drops every fringe pixel, and with it the points of small stars and
    diamonds). Pixels further than ``MAX_RESIDUAL`` from every line (greys, black, off-palette
    colours) are ignored; noise of std 15 levels lies inside it with room to spare, and the nearest
    two lines (red and orange) are still 64 apart at half coverage, so fringes do not turn into
    rings of a wrong colour. Plain RGB rather than a perceptual space, because the palette is defined
    and kept far apart in RGB and blur mixes linearly there. Objects are the 8-connected components
    of each colour with at least ``MIN_OBJECT_FRACTION`` of the image area (and
    ``MIN_OBJECT_PIXELS``), so noise specks are not objects while the smallest star of the 32 px
    profile (14 pixels) still is.

    Kind: the component's mask is compared with the five ideal outlines drawn by
    ``shapes.draw_shape`` and the kind with the best IoU wins. Two fits per kind, the better counts:
    * area fit: the outline, drawn large, is scaled to the mask's area and centred on its centroid
      (soft IoU, the outline sampled at 4x4 points per pixel). Blur cut at half coverage keeps
      straight edges in place and only rounds corners, so area and centroid barely move, while the
      bbox shrinks at every pointed tip; a bbox fit therefore read blurred diamonds as circles.
    * native fit: draw_shape's own pixels at the sides whose outline has exactly the mask's bbox.
      At a few pixels per side rasterisation decides the outline (a 6 px circle is an octagon, a
      6 px star a blob), so only the renderer's own pattern tells them apart in the 32 px profile.
    IoU over whole outlines also separates kinds that simple features confuse (a triangle and a
    diamond both fill half their bbox).

    Centre: the bbox centre ((x0 + x1) / 2, (y0 + y1) / 2) with x1, y1 exclusive, as in the
    dataset's metadata, so a clean render reproduces the metadata's bboxes and centres exactly for
    every kind but the star: its points stop short of the box it is drawn in, so its detected bbox
    is tighter and its centre sits higher by under a tenth of its side, far below the quarter of
    the image side by which the dataset's relations hold.

Definitions (per image)
    count      objects named by the caption; ``detected`` is every object found (all colours,
               every large enough component), ``count_ok`` when the two agree, so a duplicate or
               an extra object fails it.
    colors     per named object: some component of its colour was found.
    shapes     per named object: its colour was found and that colour's largest component has the
               named kind.
    positions  per stated relation: both colours were found and the relation holds between the
               centres of their largest components. Generated images get margin 0: only the order
               along the axis counts (strictly: equal centres hold no relation), unlike the quarter
               side the dataset keeps between the shapes it draws.
    Sizes (small/large) are parsed but not scored, as GenEval does not score size either.

Colours are distinct within a caption, so a colour names one object; captions that repeat a colour
are rejected, since their objects could not be told apart.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from tokenline.data.shapes import COLORS, KINDS, RELATION_WORDS, Shape, draw_shape
from tokenline.data.shapes_captions import ExpectedObject, ExpectedScene, parse_caption

__all__ = [
    "DetectedObject",
    "ExpectedObject",
    "ExpectedScene",
    "check_image",
    "detect_objects",
    "parse_caption",
    "score_images",
]

BACKGROUND = (255, 255, 255)
MIN_COVERAGE = 0.5           # share of a pixel's mix that must be the colour: a blurred edge's midpoint
MAX_RESIDUAL = 60.0          # RGB distance from a colour's white-mix line; see the module docstring
MIN_OBJECT_FRACTION = 0.006  # of the image area: 6 px at 32 px, 25 px at 64 px
MIN_OBJECT_PIXELS = 4
TEMPLATE_SIDE = 128          # box side of the ideal outlines that are scaled to detected masks
SUBSAMPLES = 4               # per pixel side, when computing how much of a pixel a fitted outline covers
# The checker's four accuracies (higher is better), as reports, gates and the nightly comparison name them.
ACCURACIES = ("shapes_color_acc", "shapes_shape_acc", "shapes_count_acc", "shapes_position_acc")

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_WHITE = np.array(BACKGROUND, dtype=np.float32)
_DIRECTIONS = np.array(list(COLORS.values()), dtype=np.float32) - _WHITE  # [colours, 3], white -> colour
_DIRECTION_NORMS2 = (_DIRECTIONS**2).sum(axis=1)
_IGNORED = -1


# -----------------------------------------------------------------------------
# Detection
# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class DetectedObject:
    """One coloured component: bbox (x0, y0, x1, y1) with x1, y1 exclusive, centre of that bbox."""
    color: str
    kind: str
    pixels: int
    center: tuple[float, float]
    bbox: tuple[int, int, int, int]


def _as_pixels(image) -> np.ndarray:
    """A PIL image or a uint8 HxWx3 array as a uint8 HxWx3 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be a PIL image or a uint8 HxWx3 array, got {array.dtype} {array.shape}")
    return array


def _color_indices(pixels: np.ndarray) -> np.ndarray:
    """Per pixel: index into COLOR_NAMES, or _IGNORED for background and pixels near no colour."""
    # Each pixel is modelled as white + coverage * (colour - white): the colour whose line from white
    # passes closest wins, and the pixel is that colour's when at least half covered.
    offsets = pixels.reshape(-1, 3).astype(np.float32) - _WHITE
    along = offsets @ _DIRECTIONS.T                                            # [pixels, colours]
    coverage = along / _DIRECTION_NORMS2
    # Squared distance to each line by Pythagoras: what is left of the offset after its projection.
    residual2 = (offsets**2).sum(axis=1, keepdims=True) - along * coverage
    nearest = residual2.argmin(axis=1)
    rows = np.arange(len(offsets))
    keep = (coverage[rows, nearest] >= MIN_COVERAGE) & (residual2[rows, nearest] <= MAX_RESIDUAL**2)
    return np.where(keep, nearest, _IGNORED).reshape(pixels.shape[:2])


def _components(indices: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """8-connected components of equal index as (index, ys, xs), by a flood fill over a padded grid."""
    height, width = indices.shape
    stride = width + 2
    # A border of _IGNORED lets the fill skip bounds checks; Python lists beat numpy item access here.
    padded = np.full((height + 2, stride), _IGNORED, dtype=np.int64)
    padded[1:-1, 1:-1] = indices
    cells = padded.ravel().tolist()
    offsets = (-stride - 1, -stride, -stride + 1, -1, 1, stride - 1, stride, stride + 1)
    seen = bytearray(len(cells))
    found = []
    for start in np.flatnonzero(padded.ravel() != _IGNORED).tolist():
        if seen[start]:
            continue
        value = cells[start]
        seen[start] = 1
        stack, members = [start], []
        while stack:
            cell = stack.pop()
            members.append(cell)
            for offset in offsets:
                neighbour = cell + offset
                if not seen[neighbour] and cells[neighbour] == value:
                    seen[neighbour] = 1
                    stack.append(neighbour)
        ys, xs = np.divmod(np.array(members), stride)
        found.append((value, ys - 1, xs - 1))
    return found


@lru_cache(maxsize=None)
def _outline_mask(kind: str, side: int) -> np.ndarray:
    """`kind` as shapes.draw_shape fills it in a side x side box, cropped to its tight bbox."""
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    draw_shape(ImageDraw.Draw(canvas), Shape(kind, "red", "large", (0, 0, side, side)))
    drawn = (np.asarray(canvas) != BACKGROUND).any(axis=2)
    ys, xs = np.nonzero(drawn)
    outline = drawn[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    outline.setflags(write=False)  # cached and shared between calls
    return outline


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    """Mean (x, y) of a mask's pixel centres, in continuous coordinates where pixel i spans [i, i + 1)."""
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


def _coverage(
    template: np.ndarray, scale: float, origin: tuple[float, float], shape: tuple[int, int]
) -> np.ndarray:
    """Share of each pixel of a `shape` grid inside `template`, placed with its corner at `origin`.

    `scale` is template pixels per grid pixel; each grid pixel is sampled at SUBSAMPLES^2 points.
    """
    offsets = (np.arange(SUBSAMPLES) + 0.5) / SUBSAMPLES
    axes = []
    for length, start, limit in zip(shape, origin[::-1], template.shape):
        points = ((np.arange(length)[:, None] + offsets[None, :]).ravel() - start) * scale
        index = np.floor(points).astype(np.int64)
        axes.append((index, (index >= 0) & (index < limit)))
    (rows, row_ok), (cols, col_ok) = axes
    inside = np.zeros((len(rows), len(cols)), dtype=np.float32)
    inside[np.ix_(row_ok, col_ok)] = template[np.ix_(rows[row_ok], cols[col_ok])]
    return inside.reshape(shape[0], SUBSAMPLES, shape[1], SUBSAMPLES).mean(axis=(1, 3))


def _soft_iou(mask: np.ndarray, coverage: np.ndarray) -> float:
    """IoU of a binary mask with a fractional coverage map of the same shape."""
    union = np.maximum(mask, coverage).sum()
    return float(np.minimum(mask, coverage).sum() / union) if union else 0.0


def _area_fit_iou(mask: np.ndarray, kind: str) -> float:
    """IoU of a mask with the ideal `kind` scaled to the same area and centred on the same centroid."""
    template = _outline_mask(kind, TEMPLATE_SIDE)
    scale = math.sqrt(template.sum() / mask.sum())
    # The fitted outline may reach past the mask's bbox (a diamond around a round blob), so compare
    # on a padded grid; cropping it to the bbox would hide exactly the part that does not match.
    pad = max(mask.shape) // 2 + 2
    padded = np.pad(mask, pad).astype(np.float32)
    (cx, cy), (tx, ty) = _centroid(mask), _centroid(template)
    origin = (cx + pad - tx / scale, cy + pad - ty / scale)
    return _soft_iou(padded, _coverage(template, scale, origin, padded.shape))


def _native_iou(mask: np.ndarray, kind: str) -> float:
    """IoU with draw_shape's own pixels for `kind` at the sides whose outline has this bbox, else 0."""
    longest = max(mask.shape)
    # A star's points stop short of its box, so its box side can exceed its bbox by a pixel or two.
    matches = [_outline_mask(kind, side) for side in range(longest, longest + 3)]
    return max((_soft_iou(mask, ideal) for ideal in matches if ideal.shape == mask.shape), default=0.0)


def _classify_kind(mask: np.ndarray) -> str:
    """The KINDS entry whose ideal outline overlaps this bbox-cropped mask best."""
    scores = {kind: max(_area_fit_iou(mask, kind), _native_iou(mask, kind)) for kind in KINDS}
    return max(KINDS, key=lambda kind: scores[kind])  # ties go to the earlier kind, deterministically


def _min_object_pixels(height: int, width: int) -> int:
    """Smallest component that counts as an object in an image of this size."""
    return max(MIN_OBJECT_PIXELS, round(MIN_OBJECT_FRACTION * height * width))


def detect_objects(image) -> list[DetectedObject]:
    """Every coloured object in a PIL image or uint8 HxWx3 array, largest first."""
    pixels = _as_pixels(image)
    minimum = _min_object_pixels(*pixels.shape[:2])
    objects = []
    for index, ys, xs in _components(_color_indices(pixels)):
        if len(ys) < minimum:
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        mask = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        mask[ys - y0, xs - x0] = True
        objects.append(
            DetectedObject(
                color=COLOR_NAMES[index],
                kind=_classify_kind(mask),
                pixels=len(ys),
                center=((x0 + x1) / 2, (y0 + y1) / 2),
                bbox=(x0, y0, x1, y1),
            )
        )
    # Sorting on more than size keeps the order independent of the scan order when sizes tie.
    objects.sort(key=lambda obj: (-obj.pixels, obj.color, obj.bbox))
    return objects


# -----------------------------------------------------------------------------
# Checks
# -----------------------------------------------------------------------------

def _relation_holds(subject: DetectedObject, obj: DetectedObject, relation: str) -> bool:
    """Whether `subject` is `relation` of `obj` by centres, with margin 0 (strict order on the axis)."""
    (sx, sy), (ox, oy) = subject.center, obj.center
    if relation == "left_of":
        return sx < ox
    if relation == "right_of":
        return sx > ox
    if relation == "above":
        return sy < oy
    if relation == "below":
        return sy > oy
    raise ValueError(f"unknown relation {relation!r}; expected one of {sorted(RELATION_WORDS)}")


def _check_scene(detected: list[DetectedObject], scene: ExpectedScene) -> dict:
    """Per-image verdicts of detected objects against a parsed caption."""
    largest: dict[str, DetectedObject] = {}
    for obj in detected:  # largest first, so the first of each colour is its largest component
        largest.setdefault(obj.color, obj)
    named = [largest.get(expected.color) for expected in scene.objects]
    positions = []
    for subject, relation, obj in scene.relations:
        found_subject, found_obj = named[subject], named[obj]
        positions.append(
            found_subject is not None
            and found_obj is not None
            and _relation_holds(found_subject, found_obj, relation)
        )
    return {
        "count": len(scene.objects),
        "detected": len(detected),
        "count_ok": len(detected) == len(scene.objects),
        "colors": [found is not None for found in named],
        "shapes": [
            found is not None and found.kind == expected.kind for found, expected in zip(named, scene.objects)
        ],
        "positions": positions,
    }


def check_image(image, caption: str) -> dict:
    """Count, colour, shape and position verdicts of one image against its caption."""
    return _check_scene(detect_objects(image), parse_caption(caption))


def _accuracies(verdicts: list[dict]) -> dict:
    """The four accuracies and the totals behind them over a list of check_image results."""
    colors = [ok for verdict in verdicts for ok in verdict["colors"]]
    shapes = [ok for verdict in verdicts for ok in verdict["shapes"]]
    positions = [ok for verdict in verdicts for ok in verdict["positions"]]
    return {
        "shapes_color_acc": sum(colors) / len(colors),
        "shapes_shape_acc": sum(shapes) / len(shapes),
        "shapes_count_acc": sum(verdict["count_ok"] for verdict in verdicts) / len(verdicts),
        "shapes_position_acc": sum(positions) / len(positions) if positions else None,
        "images": len(verdicts),
        "objects": len(colors),
        "relations": len(positions),
    }


def score_images(images, captions) -> dict:
    """Accuracies over paired images and captions: overall, by the caption's object count, by object and by relation."""
    images, captions = list(images), list(captions)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("no images to score")
    # Parse everything first so an off-grammar caption fails before any detection work.
    scenes = [parse_caption(caption) for caption in captions]
    verdicts = [_check_scene(detect_objects(image), scene) for image, scene in zip(images, scenes)]
    groups: dict[int, list[dict]] = defaultdict(list)
    for verdict in verdicts:
        groups[verdict["count"]].append(verdict)
    report = _accuracies(verdicts)
    report["by_count"] = {str(count): _accuracies(groups[count]) for count in sorted(groups)}
    return report | _breakdown(verdicts, scenes)


def _breakdown(verdicts: list[dict], scenes: list[ExpectedScene]) -> dict:
    """Shape accuracy per named "size kind" and position accuracy per relation, each with its count.

    These say where a generator (or a tokenizer's reconstructions) fails: a small star that reads
    as a blob, or a relation learned backwards, hide inside the overall accuracies.
    """
    shapes: dict[str, list[bool]] = defaultdict(list)
    positions: dict[str, list[bool]] = defaultdict(list)
    for verdict, scene in zip(verdicts, scenes):
        for expected, ok in zip(scene.objects, verdict["shapes"]):
            shapes[f"{expected.size} {expected.kind}"].append(ok)
        for (_, relation, _), ok in zip(scene.relations, verdict["positions"]):
            positions[relation].append(ok)
    return {
        "by_object": {name: {"objects": len(oks), "shapes_shape_acc": sum(oks) / len(oks)}
                      for name, oks in sorted(shapes.items())},
        "by_relation": {name: {"relations": len(oks), "shapes_position_acc": sum(oks) / len(oks)}
                        for name, oks in sorted(positions.items())},
    }
