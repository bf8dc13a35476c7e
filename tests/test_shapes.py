"""The Shapes world: determinism, annotations against pixels, captions against annotations."""

import hashlib
import re

import numpy as np
import pytest
from PIL import Image

from arrag.shapes.dataset import ShapesConfig, read_annotations, write_split
from arrag.shapes.render import coverage, render
from arrag.shapes.scene import Scene, ShapeObject, sample_scene
from arrag.shapes.vocab import BACKGROUNDS, CLASSES, COLORS, NUMBERS, PLURALS

CONFIG = ShapesConfig(seed=7)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "train"
    write_split(out, "train", 120, CONFIG)
    return out


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_gives_byte_identical_pngs(split, tmp_path):
    again = tmp_path / "train"
    write_split(again, "train", 120, CONFIG)
    for sub in ("images", "masks"):
        first = sorted((split / sub).iterdir())
        assert [p.name for p in first] == sorted(p.name for p in (again / sub).iterdir())
        assert all(digest(p) == digest(again / sub / p.name) for p in first)
    assert (split / "annotations.jsonl").read_bytes() == (again / "annotations.jsonl").read_bytes()


def test_other_seed_and_other_split_differ(split, tmp_path):
    write_split(tmp_path / "s8", "train", 20, ShapesConfig(seed=8))
    write_split(tmp_path / "db", "database", 20, CONFIG)
    ours = {digest(p) for p in (split / "images").iterdir()}
    assert not ours & {digest(p) for p in (tmp_path / "s8" / "images").iterdir()}
    assert not ours & {digest(p) for p in (tmp_path / "db" / "images").iterdir()}
    ids = {r["id"] for r in read_annotations(tmp_path / "db")}
    assert not ids & {r["id"] for r in read_annotations(split)}


def test_masks_boxes_and_colours_match_pixels(split):
    for record in read_annotations(split):
        pixels = np.asarray(Image.open(split / "images" / f"{record['id']}.png"))
        mask = np.asarray(Image.open(split / "masks" / f"{record['id']}.png"))
        assert set(np.unique(mask)) <= set(range(len(record["objects"]) + 1))
        for index, obj in enumerate(record["objects"]):
            ys, xs = np.nonzero(mask == index + 1)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == obj["box"], "box is the mask's tight box"
            # A mask pixel is covered at least half: before rounding it is nearer the object's colour than the
            # background's; rounding to uint8 (0.5 per channel) moves each distance by up to sqrt(3) / 2, their
            # difference by up to sqrt(3).
            # The pixels well inside have the object's colour exactly: more than half of each mask (measured
            # at least 0.55 over these renders; the smallest shapes are mostly edge).
            inside = pixels[mask == index + 1].astype(float)
            colour, background = np.array(COLORS[obj["color"]]), np.array(BACKGROUNDS[record["background"]])
            to_colour = np.linalg.norm(inside - colour, axis=1)
            assert (to_colour <= np.linalg.norm(inside - background, axis=1) + np.sqrt(3)).all()
            assert (to_colour == 0).mean() > 0.5
        # Outside every object's bounding square, the pixels are the background's colour.
        far = np.ones(mask.shape, dtype=bool)
        for obj in record["objects"]:
            (cx, cy), half = obj["center"], obj["size"] / 2
            far[int(cy - half):int(np.ceil(cy + half)) + 1, int(cx - half):int(np.ceil(cx + half)) + 1] = False
        assert (pixels[far] == BACKGROUNDS[record["background"]]).all()


def _mentioned_classes(text):
    words = re.findall(r"[a-z]+", text.lower())
    singular = {PLURALS[c]: c for c in CLASSES} | {c: c for c in CLASSES}
    return [singular[w] for w in words if w in singular]


def test_captions_name_exactly_the_annotated_objects(split):
    for record in read_annotations(split):
        objects = record["objects"]
        text = record["caption"]
        assert set(_mentioned_classes(text)) == {o["class"] for o in objects}, text
        words = set(re.findall(r"[a-z]+", text))
        assert words & set(COLORS) <= {o["color"] for o in objects}, text
        if record["kind"] == "count":
            assert NUMBERS[len(objects)] in words, text
        else:
            assert len(_mentioned_classes(text)) == len(objects), text
        if record["background"] in words:
            assert "background" in words


def geneval_relations(box_a, box_b):
    """GenEval's position rule (official evaluate_images.py): relation of A to B."""
    boxes = np.array([box_a, box_b], dtype=float).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - 0.1 * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):  # the official code's constant
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {name for name, hit in [("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                   ("below", dy > 0.5)] if hit}


def test_relation_scenes_satisfy_geneval_position_rule():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene, text, kind = sample_scene(rng, 64, kind="relation")
        a, rel, b = scene.relation
        _, _, boxes = render(scene, 64)
        assert geneval_relations(boxes[a], boxes[b]) == {rel}, text


def test_objects_do_not_overlap_and_stay_inside():
    rng = np.random.default_rng(1)
    for kind in ("single", "pair", "relation", "count"):
        for _ in range(50):
            scene, _, _ = sample_scene(rng, 64, kind=kind)
            covers = np.stack([coverage(o, 64) for o in scene.objects]).astype(int)
            assert ((covers > 0).sum(axis=0) <= 1).all()
            assert covers[:, 0, :].sum() == covers[:, -1, :].sum() == 0
            assert covers[:, :, 0].sum() == covers[:, :, -1].sum() == 0


def test_every_class_renders_distinct_silhouettes():
    silhouettes = {c: coverage(ShapeObject(c, "red", 32.0, 32.0, 40.0), 64) >= 128 for c in CLASSES}
    for a in CLASSES:
        for b in CLASSES:
            if a < b:  # 40 px: a few percent of a 40 px shape's area; measured at least 260
                assert (silhouettes[a] != silhouettes[b]).sum() > 40, (a, b)


def test_render_of_hand_made_scene():
    scene = Scene("light", (ShapeObject("square", "blue", 20.0, 30.0, 10.0),))
    image, mask, boxes = render(scene, 64)
    assert boxes == [[15, 25, 25, 35]]
    assert (mask == 1).sum() == 100
    assert np.asarray(image)[30, 20].tolist() == list(COLORS["blue"])
