"""Render a Shapes scene to pixels, with a per-object instance mask and tight boxes.

Each object is drawn as a polygon at `supersample` times the resolution and box-averaged down, which
gives anti-aliased edges. An object's mask is the pixels it covers at least half; its box is the
tight box of its mask, [x1, y1, x2, y2] in pixels with x2, y2 exclusive.
Rendering is pure integer/float arithmetic in PIL and numpy, so the same scene gives the same bytes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from arrag.shapes.scene import Scene, ShapeObject
from arrag.shapes.vocab import BACKGROUNDS, COLORS


def _polygon(cls: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape with bounding half-side r (None for the circle, drawn as an ellipse)."""
    if cls == "circle":
        return None
    if cls == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if cls == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if cls == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if cls == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.42 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if cls == "cross":
        w = 0.33 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape class {cls!r}")


def coverage(obj: ShapeObject, image_size: int, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel the object covers, uint8 0..255, [image_size, image_size]."""
    big = image_size * supersample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = obj.cx * supersample, obj.cy * supersample, obj.size * supersample / 2
    vertices = _polygon(obj.cls, cx, cy, r)
    if vertices is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(vertices, fill=255)
    return np.asarray(canvas.reduce(supersample))


def render(scene: Scene, image_size: int, supersample: int = 4) -> tuple[Image.Image, np.ndarray, list[list[int]]]:
    """Pixels, instance mask and boxes of a scene.

    Returns (RGB image [S, S], mask uint8 [S, S] with 0 = background and i + 1 = object i,
    boxes [[x1, y1, x2, y2], ...] per object, exclusive ends).
    """
    background = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    pixels = np.broadcast_to(background, (image_size, image_size, 3)).copy()
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    boxes = []
    for index, obj in enumerate(scene.objects):
        cover = coverage(obj, image_size, supersample)
        alpha = cover[..., None].astype(np.float64) / 255.0
        pixels = pixels * (1.0 - alpha) + np.array(COLORS[obj.color], dtype=np.float64) * alpha
        inside = cover >= 128
        mask[inside] = index + 1
        ys, xs = np.nonzero(inside)
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
    image = Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")
    return image, mask, boxes
