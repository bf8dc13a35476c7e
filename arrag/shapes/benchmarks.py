"""The three benchmarks of the paper, generated from Shapes scene graphs in their official file formats.

- GenEval: `geneval/evaluation_metadata.jsonl` (tags single_object, two_object, counting, colors,
  position, color_attr; the schema of the real file) and `geneval/object_names.txt`.
- DPG-Bench: `dpg_bench/prompts/<id>.txt` and `dpg_bench/dpg_bench.csv` with the official columns,
  parent dependencies and L1/L2 categories; `dpg_bench/truth/` holds a render of each prompt's scene
  graph with its annotations, for validating a VQA backend against ground truth.
- MJHQ-30K: `mjhq/meta_data.json` ({id: {category, prompt}}) and reference images
  `mjhq/images/<category>/<id>.png` taken from the held-out split (category: class of the first object).
`vocabulary.json` is written beside them.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from arrag.benchmarks import DPG_COLUMNS, GENEVAL_TAGS
from arrag.shapes.dataset import ShapesConfig, annotation, save_png, scene_rng
from arrag.shapes.render import render
from arrag.shapes.scene import Scene, noun_phrase, place_objects
from arrag.shapes.vocab import (
    BACKGROUNDS,
    CLASSES,
    COLORS,
    NUMBERS,
    PLURALS,
    RELATION_PHRASES,
    RELATIONS,
    write_vocabulary,
)
from evaluators.io import write_bytes_atomic, write_json_atomic


@dataclass(frozen=True)
class BenchmarkSizes:
    geneval_per_tag: int = 12  # prompts per tag (capped by the number of distinct prompts of the tag)
    dpg_prompts: int = 40
    mjhq_images: int = 300


def _a(cls: str, color: str | None = None) -> str:
    return noun_phrase(cls, color, 1)


def geneval_candidates(tag: str) -> list[dict]:
    """Every distinct GenEval-format prompt of `tag` over the Shapes vocabulary, in a fixed order."""
    colors = list(COLORS)
    pairs = list(itertools.permutations(CLASSES, 2))
    if tag == "single_object":
        return [{"tag": tag, "include": [{"class": c, "count": 1}], "prompt": f"a photo of {_a(c)}"}
                for c in CLASSES]
    if tag == "two_object":
        return [{"tag": tag, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                 "prompt": f"a photo of {_a(a)} and {_a(b)}"} for a, b in itertools.combinations(CLASSES, 2)]
    if tag == "counting":
        return [{"tag": tag, "include": [{"class": c, "count": n}], "exclude": [{"class": c, "count": n + 1}],
                 "prompt": f"a photo of {NUMBERS[n]} {PLURALS[c]}"} for c in CLASSES for n in (2, 3, 4)]
    if tag == "colors":
        return [{"tag": tag, "include": [{"class": c, "count": 1, "color": k}],
                 "prompt": f"a photo of {_a(c, k)}"} for c in CLASSES for k in colors]
    if tag == "position":
        return [{"tag": tag, "include": [{"class": a, "count": 1},
                                         {"class": b, "count": 1, "position": [rel, 0]}],
                 "prompt": f"a photo of {_a(b)} {rel} {_a(a)}"} for a, b in pairs for rel in RELATIONS]
    if tag == "color_attr":
        return [{"tag": tag, "include": [{"class": a, "count": 1, "color": ka},
                                         {"class": b, "count": 1, "color": kb}],
                 "prompt": f"a photo of {_a(a, ka)} and {_a(b, kb)}"}
                for a, b in pairs for ka, kb in itertools.permutations(colors, 2)]
    raise ValueError(f"unknown GenEval tag {tag!r}; allowed: {', '.join(GENEVAL_TAGS)}")


def geneval_metadata(config: ShapesConfig, per_tag: int) -> list[dict]:
    """`per_tag` prompts of each tag, drawn without repetition, in GenEval's tag order."""
    rows = []
    for code, tag in enumerate(GENEVAL_TAGS):
        candidates = geneval_candidates(tag)
        order = scene_rng(config, "geneval", code).permutation(len(candidates))
        rows += [candidates[i] for i in order[:per_tag]]
    return rows


def _dpg_scene(rng: np.random.Generator, image_size: int) -> tuple[Scene, list[tuple[str, str, int]]]:
    """A DPG scene: two single objects in a relation and, usually, a third group of 1-3 objects."""
    while True:
        n_groups = 3 if rng.random() < 0.7 else 2
        classes = [str(c) for c in rng.choice(CLASSES, size=n_groups, replace=False)]
        colors = [str(c) for c in rng.choice(list(COLORS), size=n_groups)]
        counts = [1, 1] + ([int(rng.integers(1, 4))] if n_groups == 3 else [])
        groups = list(zip(classes, colors, counts, strict=True))
        specs = [(cls, color, float(rng.uniform(0.16, 0.24)) * image_size)
                 for cls, color, count in groups for _ in range(count)]
        relation = (0, str(rng.choice(RELATIONS)), 1)
        objects = place_objects(rng, specs, image_size, relation)
        if objects is not None:
            return Scene(str(rng.choice(list(BACKGROUNDS))), objects, relation), groups


def _dpg_text(rng: np.random.Generator, scene: Scene, groups: list[tuple[str, str, int]]) -> str:
    (a, ka, _), (b, kb, _) = groups[:2]
    rel = RELATION_PHRASES[scene.relation[1]]
    first, second = _a(a, ka), _a(b, kb)
    extra = noun_phrase(*groups[2]) if len(groups) == 3 else None
    verb = "is" if len(groups) == 3 and groups[2][2] == 1 else "are"
    if rng.random() < 0.5:
        text = f"On a {scene.background} background, {first} is placed {rel} {second}."
        if extra:
            text += f" Nearby, {extra} {verb} also visible."
    else:
        text = f"{first[0].upper()}{first[1:]} sits {rel} {second}"
        text += f", and {extra} {verb} also in the picture" if extra else ""
        text += f", all set against a {scene.background} background."
    return text


def _dpg_questions(item_id: str, text: str, scene: Scene, groups: list[tuple[str, str, int]]) -> list[dict]:
    """Questions in DPG-Bench's CSV schema. Dependencies name parent proposition ids ("0": none)."""
    rows: list[dict] = []

    def add(parents: list[int], broad: str, detailed: str, tuple_text: str, question: str) -> int:
        rows.append({"item_id": item_id, "text": text, "keywords": ", ".join(g[0] for g in groups),
                     "proposition_id": len(rows) + 1, "dependency": ",".join(map(str, parents or [0])),
                     "category_broad": broad, "category_detailed": detailed, "tuple": tuple_text,
                     "question_natural_language": question})
        return len(rows)

    entity_ids = []
    for cls, color, count in groups:
        noun = cls if count == 1 else PLURALS[cls]
        if count == 1:
            entity = add([], "entity", "whole", f"entity - whole ({noun})", f"Is there {_a(cls)}?")
        else:
            entity = add([], "entity", "whole", f"entity - whole ({noun})", f"Are there {noun}?")
            add([entity], "other", "count", f"other - count ({noun}, =={count})",
                f"Are there {NUMBERS[count]} {noun}?")
        be = "Is the" if count == 1 else "Are the"
        add([entity], "attribute", "color", f"attribute - color ({noun}, {color})", f"{be} {noun} {color}?")
        entity_ids.append(entity)
    (a, _, _), (b, _, _) = groups[:2]
    rel = scene.relation[1]
    add(entity_ids[:2], "relation", "spatial", f"relation - spatial ({a}, {b}, {rel})",
        f"Is the {a} {RELATION_PHRASES[rel]} the {b}?")
    add([], "global", "background", f"global - ({scene.background} background)",
        f"Is the background {scene.background}?")
    return rows


def write_geneval(out_dir: Path, config: ShapesConfig, per_tag: int) -> None:
    rows = geneval_metadata(config, per_tag)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    write_bytes_atomic(out_dir / "geneval" / "evaluation_metadata.jsonl", lines.encode())
    write_bytes_atomic(out_dir / "geneval" / "object_names.txt", ("\n".join(CLASSES) + "\n").encode())


def write_dpg(out_dir: Path, config: ShapesConfig, count: int) -> None:
    rows, truth = [], []
    for index in range(count):
        item_id = f"shapes{index:04d}"
        rng = scene_rng(config, "dpg", index)
        scene, groups = _dpg_scene(rng, config.image_size)
        text = _dpg_text(rng, scene, groups)
        write_bytes_atomic(out_dir / "dpg_bench" / "prompts" / f"{item_id}.txt", text.encode())
        rows += _dpg_questions(item_id, text, scene, groups)
        image, mask, boxes = render(scene, config.image_size, config.supersample)
        save_png(image, out_dir / "dpg_bench" / "truth" / "images" / f"{item_id}.png")
        save_png(Image.fromarray(mask, "L"), out_dir / "dpg_bench" / "truth" / "masks" / f"{item_id}.png")
        truth.append(annotation(item_id, scene, text, "dpg", boxes))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=DPG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(out_dir / "dpg_bench" / "dpg_bench.csv", buffer.getvalue().encode())
    lines = "".join(json.dumps(t, sort_keys=True) + "\n" for t in truth)
    write_bytes_atomic(out_dir / "dpg_bench" / "truth" / "annotations.jsonl", lines.encode())


def write_mjhq(out_dir: Path, heldout_dir: Path, heldout: list[dict], count: int) -> None:
    if count > len(heldout):
        raise ValueError(f"mjhq_images = {count} exceeds the held-out split ({len(heldout)} images): "
                         "raise shapes.splits.heldout or lower benchmarks.mjhq_images")
    meta = {}
    for record in heldout[:count]:
        category = record["objects"][0]["class"]
        meta[record["id"]] = {"category": category, "prompt": record["caption"]}
        target = out_dir / "mjhq" / "images" / category / f"{record['id']}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(heldout_dir / "images" / f"{record['id']}.png", target)
    write_json_atomic(out_dir / "mjhq" / "meta_data.json", meta)


def write_benchmarks(out_dir: str | Path, config: ShapesConfig, sizes: BenchmarkSizes,
                     heldout_dir: str | Path, heldout: list[dict]) -> None:
    """Write the three benchmarks and `vocabulary.json` under `out_dir`."""
    out_dir = Path(out_dir)
    write_geneval(out_dir, config, sizes.geneval_per_tag)
    write_dpg(out_dir, config, sizes.dpg_prompts)
    write_mjhq(out_dir, Path(heldout_dir), heldout, sizes.mjhq_images)
    write_vocabulary(out_dir / "vocabulary.json", config.image_size)
