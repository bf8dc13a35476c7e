"""Write and read Shapes-world splits: captioned images with per-object annotations.

Layout of one split folder:
    images/<id>.png        RGB, image_size x image_size
    masks/<id>.png         instance mask, 0 = background, i + 1 = object i
    annotations.jsonl      one line per image, sorted by id: id, caption, kind, background,
                           objects [{class, color, box [x1, y1, x2, y2] (exclusive ends), center, size}],
                           relation [a, "left of", b] or null

Image i of split s is drawn from its own generator seeded by (seed, code of s, i): the splits are
disjoint by construction, and any image can be regenerated alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from arrag.shapes.render import render
from arrag.shapes.scene import Scene, sample_scene
from evaluators.io import write_bytes_atomic

SPLIT_CODES = {"database": 0, "train": 1, "heldout": 2, "geneval": 3, "dpg": 4}


@dataclass(frozen=True)
class ShapesConfig:
    seed: int = 0
    image_size: int = 64
    supersample: int = 4


def scene_rng(config: ShapesConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, SPLIT_CODES[split], index])


def annotation(image_id: str, scene: Scene, caption: str, kind: str, boxes: list[list[int]]) -> dict:
    return {
        "id": image_id,
        "caption": caption,
        "kind": kind,
        "background": scene.background,
        "objects": [
            {"class": o.cls, "color": o.color, "box": box, "center": [round(o.cx, 3), round(o.cy, 3)],
             "size": round(o.size, 3)}
            for o, box in zip(scene.objects, boxes, strict=True)
        ],
        "relation": list(scene.relation) if scene.relation else None,
    }


def save_png(image, path: Path) -> None:
    """PNG without metadata: the same pixels always give the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False, compress_level=6)


def write_split(out_dir: str | Path, split: str, count: int, config: ShapesConfig) -> list[dict]:
    """Render `count` scenes of `split` into `out_dir` (layout above); returns the annotations."""
    out_dir = Path(out_dir)
    records = []
    for index in tqdm(range(count), desc=f"render {split}", unit="img", mininterval=2):
        image_id = f"{split}-{index:06d}"
        scene, text, kind = sample_scene(scene_rng(config, split, index), config.image_size)
        image, mask, boxes = render(scene, config.image_size, config.supersample)
        save_png(image, out_dir / "images" / f"{image_id}.png")
        save_png(Image.fromarray(mask, "L"), out_dir / "masks" / f"{image_id}.png")
        records.append(annotation(image_id, scene, text, kind, boxes))
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    write_bytes_atomic(out_dir / "annotations.jsonl", lines.encode())
    return records


def read_annotations(split_dir: str | Path) -> list[dict]:
    """The annotations of a split folder, in id order."""
    path = Path(split_dir) / "annotations.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the split first (rule shapes_world)")
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
