"""The grammar of `shapes` captions: parse one into the objects and relations it states, or swap its first two objects.

The source writes captions with `caption_for`; the compositional checker reads them back with
`parse_caption`, and the generator's swap term pairs each caption with `swapped_caption`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from tokenline.data.shapes import (
    COLORS,
    KINDS,
    RELATION_WORDS,
    SIZES,
    Shape,
    caption_for,
)


@dataclass(frozen=True)
class ExpectedObject:
    """One object a caption names."""
    kind: str
    color: str
    size: str


@dataclass(frozen=True)
class ExpectedScene:
    """Objects of a caption in order, and relations as (subject index, relation key, object index)."""
    objects: tuple[ExpectedObject, ...]
    relations: tuple[tuple[int, str, int], ...]


def _alternatives(words: Iterable[str]) -> str:
    """Regex alternation of literal words, longest first so no word shadows a longer one."""
    return "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))


def _phrase(name: str) -> str:
    """Regex of `size colour kind` with groups named `<name>_size`, `<name>_color`, `<name>_kind`."""
    return (
        rf"(?P<{name}_size>{_alternatives(SIZES)}) (?P<{name}_color>{_alternatives(COLORS)}) "
        rf"(?P<{name}_kind>{_alternatives(KINDS)})"
    )


def _relation(name: str) -> str:
    """Regex of a relation's words as the group `name`."""
    return rf"(?P<{name}>{_alternatives(RELATION_WORDS.values())})"


_CAPTION = re.compile(
    rf"a {_phrase('first')}"
    rf"(?: {_relation('first_relation')} a {_phrase('second')}"
    rf"(?: and a {_phrase('third')} {_relation('third_relation')} the {_phrase('referent')})?)?"
)
_RELATION_KEYS = {words: key for key, words in RELATION_WORDS.items()}


def _named_object(match: re.Match, name: str) -> ExpectedObject:
    """The object of the phrase groups `name` in a caption match."""
    kind, color, size = (match[f"{name}_{part}"] for part in ("kind", "color", "size"))
    return ExpectedObject(kind=kind, color=color, size=size)


def parse_caption(caption: str) -> ExpectedScene:
    """Objects and relations of a `shapes` caption; ValueError naming the caption if it is off-grammar."""
    # Case and runs of whitespace are forgiven; anything else outside the grammar is an error.
    match = _CAPTION.fullmatch(" ".join(caption.lower().split()))
    if match is None:
        raise ValueError(f"caption does not follow the shapes grammar: {caption!r}")
    objects = [_named_object(match, "first")]
    relations: list[tuple[int, str, int]] = []
    if match["second_kind"] is not None:
        objects.append(_named_object(match, "second"))
        relations.append((0, _RELATION_KEYS[match["first_relation"]], 1))
    if match["third_kind"] is not None:
        objects.append(_named_object(match, "third"))
        relations.append((2, _RELATION_KEYS[match["third_relation"]], 1))
        if _named_object(match, "referent") != objects[1]:
            raise ValueError(f"caption refers back to an object it did not name: {caption!r}")
    colors = [obj.color for obj in objects]
    if len(set(colors)) != len(colors):
        raise ValueError(f"caption repeats a colour, so its objects cannot be told apart: {caption!r}")
    return ExpectedScene(objects=tuple(objects), relations=tuple(relations))


def swapped_caption(caption: str) -> str | None:
    """The caption with its first two objects exchanged: the same words, the opposite layout.

    "a large red circle above a small blue square" becomes "a small blue square above a large
    red circle"; a three-object caption's second relation then refers to the first object. None
    for a caption that states no relation, or one outside the shapes grammar.
    """
    try:
        scene = parse_caption(caption)
    except ValueError:
        return None
    if not scene.relations:
        return None
    first, second, *rest = (Shape(o.kind, o.color, o.size, (0, 0, 0, 0)) for o in scene.objects)
    relations = [{"subject": s, "relation": r, "object": o} for s, r, o in scene.relations]
    return caption_for([second, first, *rest], relations)
