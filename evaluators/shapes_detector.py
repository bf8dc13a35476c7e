"""The Shapes-world detector: objects (class, score, box, colour, mask) from the pixels of one image.

It stands in for GenEval's Mask2Former and DPG-Bench's VQA model in the Shapes world, whose images are
flat-coloured, anti-aliased, non-overlapping shapes on a plain background (`vocabulary.json` holds
the class names, colour RGBs and background RGBs). Steps, all on numpy arrays:

1. background = per-channel median of the image's border pixels;
2. foreground = pixels farther than `foreground_threshold` (RGB units) from the background;
   8-connected components of it are object candidates (small ones are noise and dropped);
3. each component's colour = median of its strongest pixels; its mask = the pixels at least half
   covered by that colour (alpha from the projection of pixel - background onto colour - background),
   which is how the renderer's ground-truth masks are defined; box = tight box of the mask;
4. shape features: fill (mask area / box area), vertical centroid (fraction of box height), solidity
   (area / convex hull area, the hull counted in pixels by Pick's rule) and the 3-, 4- and 5-fold
   angular harmonics of the mask about its centroid (triangle, square/diamond/cross, star; they
   survive blur better than corner counts);
5. class = nearest prototype in units of each feature's spread; score = posterior of that class among
   all classes plus an outlier class at `outlier_distance` (a blob resembling no shape scores low);
   colour name = nearest vocabulary colour to the component's colour.

`validate_detector` measures precision and recall against a split's annotations.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull
from tqdm import tqdm

from evaluators.io import load_rgb

# Mean features (fill, vertical centroid, solidity, harmonics 3, 4, 5) of rendered shapes 8-30 px wide,
# measured on the pixel masks of 1,500 clean renders (continuous shapes: fill pi/4, 1, 1/2, 1/2, 0.36,
# 0.55; triangle centroid 2/3; star solidity 0.52, cross 0.71; pixelisation raises the small values).
PROTOTYPES = {
    "circle": (0.77, 0.50, 0.96, 0.01, 0.02, 0.01),
    "square": (1.00, 0.50, 1.00, 0.00, 0.28, 0.00),
    "triangle": (0.55, 0.65, 0.94, 0.54, 0.01, 0.14),
    "diamond": (0.53, 0.50, 0.955, 0.02, 0.29, 0.01),
    "star": (0.43, 0.55, 0.61, 0.05, 0.04, 0.61),
    "cross": (0.57, 0.50, 0.76, 0.04, 0.46, 0.01),
}
# Spread of each feature (same order), about twice its spread over clean renders: a distance of 1
# is one spread away in every feature.
FEATURE_SCALES = (0.06, 0.04, 0.05, 0.08, 0.06, 0.08)


@dataclass(frozen=True)
class Vocabulary:
    """The Shapes world's names and colours, read from `vocabulary.json`."""

    classes: tuple[str, ...]
    plurals: dict[str, str]
    colors: dict[str, tuple[int, int, int]]
    backgrounds: dict[str, tuple[int, int, int]]
    numbers: dict[int, str]
    relation_phrases: dict[str, str]  # "left of" -> "to the left of"


def vocabulary_from_dict(data: dict) -> Vocabulary:
    """A Vocabulary from the content of `vocabulary.json`."""
    return Vocabulary(
        classes=tuple(data["classes"]),
        plurals=dict(data["plurals"]),
        colors={name: tuple(rgb) for name, rgb in data["colors"].items()},
        backgrounds={name: tuple(rgb) for name, rgb in data["backgrounds"].items()},
        numbers={int(n): word for n, word in data["numbers"].items()},
        relation_phrases=dict(data["relation_phrases"]),
    )


def load_vocabulary(path: str | Path) -> Vocabulary:
    path = Path(path)
    try:
        return vocabulary_from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot read the Shapes vocabulary {path}: {err!r}") from err


@dataclass(frozen=True)
class DetectorSettings:
    foreground_threshold: float = 35.0  # RGB distance from the background; the smallest object/background
    # distance of the vocabulary is 84, so every pixel at least half covered by an object is foreground
    min_area: int = 12  # pixels; smaller components are noise (the smallest rendered star has ~30)
    outlier_distance: float = 4.0  # feature distance at which a blob is as likely noise as a shape


def nearest_name(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    """Name of the table colour nearest to `rgb` (Euclidean distance in RGB)."""
    names = list(table)
    distances = np.linalg.norm(np.asarray([table[n] for n in names], dtype=np.float64) - rgb, axis=1)
    return names[int(np.argmin(distances))]


def border_color(pixels: np.ndarray) -> np.ndarray:
    """Per-channel median of the outermost pixel ring of an image [H, W, 3]; float [3]."""
    ring = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]]).astype(np.float64)
    return np.median(ring, axis=0)


def shape_features(mask: np.ndarray) -> tuple[float, ...]:
    """(fill, vertical centroid, solidity, harmonic 3, harmonic 4, harmonic 5) of a boolean mask [H, W]
    cropped to its tight box. Harmonic k = |sum r^2 exp(i k theta)| / sum r^2 over the mask's pixels, polar
    coordinates about the centroid: 0 for a disc, large for a shape with k-fold symmetry."""
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    x, y = xs - xs.mean(), ys - ys.mean()
    r2, theta = x**2 + y**2, np.arctan2(y, x)
    total = max(float(r2.sum()), 1e-6)
    harmonics = [float(np.abs(np.sum(r2 * np.exp(1j * k * theta)))) / total for k in (3, 4, 5)]
    hull = ConvexHull(np.stack([xs + 0.5, ys + 0.5], axis=1), qhull_options="QJ")  # joggled: collinear ok
    hull_pixels = hull.volume + hull.area / 2 + 1  # Pick's rule: pixels ~ area + perimeter / 2 + 1
    solidity = min(len(xs) / hull_pixels, 1.0)
    return (len(xs) / (width * height), float(np.mean(ys + 0.5)) / height, solidity, *harmonics)


def classify_shape(
    features: tuple[float, ...], classes: tuple[str, ...], outlier_distance: float
) -> tuple[str, float]:
    """(class, score): nearest prototype and its posterior (Gaussian likelihoods, equal priors,
    plus an outlier class at `outlier_distance`)."""
    delta = (np.asarray([PROTOTYPES[c] for c in classes]) - np.asarray(features)) / np.asarray(FEATURE_SCALES)
    distances = np.linalg.norm(delta, axis=1)
    likelihood = np.exp(-0.5 * distances**2)
    best = int(np.argmin(distances))
    score = likelihood[best] / (likelihood.sum() + np.exp(-0.5 * outlier_distance**2))
    return classes[best], float(score)


class ShapesDetector:
    """Detects Shapes-world objects; `detect` returns GenEval-style raw detections."""

    def __init__(self, vocabulary: Vocabulary, settings: DetectorSettings | None = None):
        unknown = [c for c in vocabulary.classes if c not in PROTOTYPES]
        if unknown:
            raise ValueError(f"the Shapes detector knows {sorted(PROTOTYPES)}, not {unknown}")
        self.vocabulary = vocabulary
        self.settings = settings or DetectorSettings()

    def background(self, pixels: np.ndarray) -> str:
        """Name of the vocabulary background nearest to the border colour of an image [H, W, 3]."""
        return nearest_name(border_color(pixels), self.vocabulary.backgrounds)

    def detect(self, pixels: np.ndarray) -> list[dict]:
        """Objects of an RGB image [H, W, 3] uint8, as dicts: "class", "score" in [0, 1],
        "box" [x1, y1, x2, y2] (pixels, exclusive ends), "color" (vocabulary name), "mask" bool [H, W]."""
        pixels = np.asarray(pixels, dtype=np.float64)
        background = border_color(pixels)
        offset = pixels - background
        foreground = np.linalg.norm(offset, axis=2) > self.settings.foreground_threshold
        labels, count = ndimage.label(foreground, structure=np.ones((3, 3), dtype=bool))
        detections = []
        for index, region in enumerate(ndimage.find_objects(labels), start=1):
            component = labels[region] == index
            if component.sum() < self.settings.min_area:
                continue
            detection = self._describe(offset[region], component, background, region, labels.shape)
            if detection is not None:
                detections.append(detection)
        detections.sort(key=lambda d: -d["score"])
        return detections

    def _describe(
        self,
        offset: np.ndarray,
        component: np.ndarray,
        background: np.ndarray,
        region: tuple[slice, slice],
        shape: tuple[int, int],
    ) -> dict | None:
        """One detection from a component (offsets from the background [h, w, 3] of its box)."""
        strength = np.linalg.norm(offset, axis=2)
        strong = component & (strength >= 0.5 * strength[component].max())
        color = np.median(offset[strong], axis=0)  # object colour minus background
        alpha = (offset @ color) / max(float(color @ color), 1e-6)
        mask = component & (alpha >= 0.5)
        if mask.sum() < self.settings.min_area:
            return None
        ys, xs = np.nonzero(mask)
        y1, x1 = region[0].start + ys.min(), region[1].start + xs.min()
        y2, x2 = region[0].start + ys.max() + 1, region[1].start + xs.max() + 1
        tight = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        cls, score = classify_shape(
            shape_features(tight), self.vocabulary.classes, self.settings.outlier_distance
        )
        full_mask = np.zeros(shape, dtype=bool)
        full_mask[region] = mask
        return {
            "class": cls,
            "score": score,
            "box": [int(x1), int(y1), int(x2), int(y2)],
            "color": nearest_name(color + background, self.vocabulary.colors),
            "mask": full_mask,
        }


def box_iou(a: list[float], b: list[float]) -> float:
    """IoU of two boxes [x1, y1, x2, y2] with exclusive ends."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0) * max(height, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_objects(detections: list[dict], truth: list[dict], min_iou: float = 0.5) -> list[tuple[int, int]]:
    """Greedy matching in detection order: (detection index, truth index) pairs of the same class
    with box IoU >= min_iou, each truth object used once."""
    used: set[int] = set()
    pairs = []
    for i, det in enumerate(detections):
        candidates = [
            (box_iou(det["box"], obj["box"]), j)
            for j, obj in enumerate(truth)
            if j not in used and obj["class"] == det["class"]
        ]
        best = max(candidates, default=(0.0, -1))
        if best[0] >= min_iou:
            used.add(best[1])
            pairs.append((i, best[1]))
    return pairs


def validate_detector(
    split_dir: str | Path,
    detector: ShapesDetector,
    images_dir: str | Path | None = None,
    min_score: float = 0.3,
    min_iou: float = 0.5,
    pixels: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """Precision and recall of the detector on a Shapes split (`annotations.jsonl` + `images/<id>.png`,
    or the images of the same ids in `images_dir`, e.g. VQ reconstructions, or `pixels[id]` uint8 [H, W, 3]
    arrays for the records whose ids it holds, which are then the only records scored). A detection counts when
    its score exceeds `min_score` (GenEval's threshold); it is a true positive when it matches an
    annotated object of its class with box IoU >= `min_iou`. Colour accuracy is over matched pairs."""
    split_dir = Path(split_dir)
    images_dir = Path(images_dir) if images_dir else split_dir / "images"
    with open(split_dir / "annotations.jsonl") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    if pixels is not None:
        records = [r for r in records if r["id"] in pixels]
    per_class = {c: {"tp": 0, "detections": 0, "objects": 0} for c in detector.vocabulary.classes}
    color_correct = background_correct = 0
    for record in tqdm(records, desc="validate shapes detector", unit="img", mininterval=2):
        image = pixels[record["id"]] if pixels is not None else np.asarray(load_rgb(images_dir / f"{record['id']}.png"))
        detections = [d for d in detector.detect(image) if d["score"] > min_score]
        pairs = match_objects(detections, record["objects"], min_iou)
        for det in detections:
            per_class[det["class"]]["detections"] += 1
        for obj in record["objects"]:
            per_class[obj["class"]]["objects"] += 1
        for i, j in pairs:
            per_class[detections[i]["class"]]["tp"] += 1
            color_correct += detections[i]["color"] == record["objects"][j]["color"]
        background_correct += detector.background(image) == record["background"]
    tp = sum(c["tp"] for c in per_class.values())
    n_det = sum(c["detections"] for c in per_class.values())
    n_obj = sum(c["objects"] for c in per_class.values())
    return {
        "precision": tp / n_det if n_det else 0.0,
        "recall": tp / n_obj if n_obj else 0.0,
        "color_accuracy": color_correct / tp if tp else 0.0,
        "background_accuracy": background_correct / len(records) if records else 0.0,
        "per_class": {
            c: {
                "precision": v["tp"] / v["detections"] if v["detections"] else 0.0,
                "recall": v["tp"] / v["objects"] if v["objects"] else 0.0,
                **v,
            }
            for c, v in per_class.items()
        },
        "n_images": len(records),
        "n_objects": n_obj,
        "n_detections": n_det,
    }
