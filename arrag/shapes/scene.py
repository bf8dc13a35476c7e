"""Scene graphs of the Shapes world: objects with class, colour, position and size, and their captions.

Coordinates are pixels of the final image (origin top-left, x right, y down). Objects never overlap:
a gap of at least `GAP` pixels separates their bounding squares, so every object is fully visible.
A relation "A left of B" is placed so that GenEval's position rule (centre offset minus
0.1 x (dimA + dimB), direction threshold 0.5) finds exactly that relation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from arrag.shapes.vocab import (
    BACKGROUNDS,
    CLASSES,
    COLORS,
    NUMBERS,
    PAIR_TEMPLATES,
    PLURALS,
    RELATION_PHRASES,
    RELATION_TEMPLATES,
    RELATIONS,
    SINGLE_TEMPLATES,
)

GAP = 2.0  # pixels between bounding squares
BORDER = 1.5  # pixels between a bounding square and the image edge
# Scene kinds of the training/database/held-out splits and their sampling weights.
KIND_WEIGHTS = {"single": 0.3, "pair": 0.2, "relation": 0.25, "count": 0.25}
# Object side as a fraction of the image side, per kind.
SIZE_RANGE = {"single": (0.28, 0.45), "pair": (0.22, 0.34), "relation": (0.22, 0.34), "count": (0.18, 0.26)}
P_COLOR_NAMED = 0.8  # a caption names an object's colour with this probability


@dataclass(frozen=True)
class ShapeObject:
    cls: str
    color: str
    cx: float  # centre, pixels
    cy: float
    size: float  # side of the bounding square, pixels


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]
    relation: tuple[int, str, int] | None = None  # (a, "left of", b): object a is left of object b


def noun_phrase(cls: str, color: str | None, count: int) -> str:
    """'a red circle', 'an orange star', 'three squares'."""
    words = [color] if color else []
    if count == 1:
        words.append(cls)
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    return " ".join([NUMBERS[count], *words, PLURALS[cls]])


def _fits(box: tuple[float, float, float], placed: list[tuple[float, float, float]]) -> bool:
    cx, cy, size = box
    for ox, oy, osize in placed:
        reach = (size + osize) / 2 + GAP
        if abs(cx - ox) < reach and abs(cy - oy) < reach:
            return False
    return True


def _random_centre(rng: np.random.Generator, size: float, image_size: int) -> tuple[float, float]:
    low, high = size / 2 + BORDER, image_size - size / 2 - BORDER
    return float(rng.uniform(low, high)), float(rng.uniform(low, high))


def _relation_centres(
    rng: np.random.Generator, size_a: float, size_b: float, relation: str, image_size: int
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Centres of A and B with A `relation` B: separation along the main axis at least the sum of
    half sizes plus the gap, offset across it at most 0.3 of the separation. None if it does not fit."""
    need = (size_a + size_b) / 2 + GAP
    room = image_size - 2 * BORDER - (size_a + size_b) / 2
    if room < need:
        return None
    sep = float(rng.uniform(need, room))
    cross = float(rng.uniform(-0.3, 0.3)) * sep
    # Along the main axis the first object (left / top) sits at `first`, the second at `first + sep`.
    a_first = relation in ("left of", "above")
    size_first, size_second = (size_a, size_b) if a_first else (size_b, size_a)
    first = float(rng.uniform(size_first / 2 + BORDER, image_size - size_second / 2 - BORDER - sep))
    a_main, b_main = (first, first + sep) if a_first else (first + sep, first)
    half = max(size_a, size_b) / 2 + BORDER
    c_lo, c_hi = half + max(0.0, -cross), image_size - half - max(0.0, cross)
    if c_lo > c_hi:
        return None
    a_cross = float(rng.uniform(c_lo, c_hi))
    b_cross = a_cross + cross
    if relation in ("left of", "right of"):
        return (a_main, a_cross), (b_main, b_cross)
    return (a_cross, a_main), (b_cross, b_main)


def place_objects(
    rng: np.random.Generator,
    specs: list[tuple[str, str, float]],
    image_size: int,
    relation: tuple[int, str, int] | None = None,
    tries: int = 200,
) -> tuple[ShapeObject, ...] | None:
    """Place objects given as (class, colour, size) without overlap; the relation, if any, holds
    between objects 0 and 1. None when no placement was found in `tries` attempts."""
    for _ in range(tries):
        placed: list[tuple[float, float, float]] = []
        start = 0
        if relation is not None:
            centres = _relation_centres(rng, specs[0][2], specs[1][2], relation[1], image_size)
            if centres is None:
                continue
            placed = [(*centres[0], specs[0][2]), (*centres[1], specs[1][2])]
            start = 2
        for _cls, _color, size in specs[start:]:
            for _ in range(tries):
                box = (*_random_centre(rng, size, image_size), size)
                if _fits(box, placed):
                    placed.append(box)
                    break
            else:
                break
        if len(placed) == len(specs):
            return tuple(ShapeObject(cls, color, cx, cy, size) for (cls, color, _), (cx, cy, size)
                         in zip(specs, placed, strict=True))
    return None


def sample_scene(rng: np.random.Generator, image_size: int, kind: str | None = None) -> tuple[Scene, str, str]:
    """A random scene, its caption and its kind (one of KIND_WEIGHTS; drawn by weight when None)."""
    kinds = list(KIND_WEIGHTS)
    if kind is None:
        kind = kinds[rng.choice(len(kinds), p=list(KIND_WEIGHTS.values()))]
    background = str(rng.choice(list(BACKGROUNDS)))
    low, high = SIZE_RANGE[kind]
    colors = list(COLORS)
    while True:
        if kind == "single":
            count, classes = 1, [str(rng.choice(CLASSES))]
        elif kind in ("pair", "relation"):
            count, classes = 1, [str(c) for c in rng.choice(CLASSES, size=2, replace=False)]
        else:
            count = int(rng.integers(2, 5))
            classes = [str(rng.choice(CLASSES))] * count
        if kind == "count" and rng.random() < 0.5:
            object_colors = [str(rng.choice(colors))] * count
        else:
            object_colors = [str(c) for c in rng.choice(colors, size=len(classes))]
        sizes = [float(rng.uniform(low, high)) * image_size for _ in classes]
        relation = (0, str(rng.choice(RELATIONS)), 1) if kind == "relation" else None
        objects = place_objects(rng, list(zip(classes, object_colors, sizes, strict=True)), image_size, relation)
        if objects is not None:
            scene = Scene(background, objects, relation)
            return scene, caption(rng, scene, kind), kind


def caption(rng: np.random.Generator, scene: Scene, kind: str) -> str:
    """A caption naming exactly the scene's objects (class always, colour usually)."""
    objs = scene.objects

    def phrase(obj: ShapeObject) -> str:
        return noun_phrase(obj.cls, obj.color if rng.random() < P_COLOR_NAMED else None, 1)

    if kind == "count":
        same_color = len({o.color for o in objs}) == 1
        color = objs[0].color if same_color and rng.random() < P_COLOR_NAMED else None
        template = SINGLE_TEMPLATES[rng.integers(len(SINGLE_TEMPLATES))]
        return template.format(obj=noun_phrase(objs[0].cls, color, len(objs)), bg=scene.background)
    if kind == "single":
        template = SINGLE_TEMPLATES[rng.integers(len(SINGLE_TEMPLATES))]
        return template.format(obj=phrase(objs[0]), bg=scene.background)
    if kind == "pair":
        template = PAIR_TEMPLATES[rng.integers(len(PAIR_TEMPLATES))]
        return template.format(a=phrase(objs[0]), b=phrase(objs[1]), bg=scene.background)
    a, rel, b = scene.relation
    template = RELATION_TEMPLATES[rng.integers(len(RELATION_TEMPLATES))]
    return template.format(a=phrase(objs[a]), rel=RELATION_PHRASES[rel], b=phrase(objs[b]), bg=scene.background)
