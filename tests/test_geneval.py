"""GenEval rules at every tag and at both sides of every threshold, the summary, the CLIP colour path,
and the CLI on a generated folder rendered from Shapes scene graphs."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from arrag.shapes.benchmarks import geneval_metadata
from arrag.shapes.dataset import ShapesConfig, write_split
from arrag.shapes.render import render
from arrag.shapes.scene import Scene, place_objects
from arrag.shapes.vocab import COLORS as SHAPES_COLORS
from arrag.shapes.vocab import write_vocabulary
from evaluators.__main__ import main
from evaluators.geneval import (
    COLORS,
    ClipColorClassifier,
    GenEvalSettings,
    color_crop,
    relative_position,
    score_image,
    select_detections,
    summarize,
)


def det(cls, score=0.95, box=(0, 0, 10, 10), color=None):
    detection = {"class": cls, "score": score, "box": list(box)}
    if color:
        detection["color"] = color
    return detection


def meta(tag, *include, exclude=()):
    return {"tag": tag, "include": list(include), "exclude": list(exclude), "prompt": "p"}


def single(cls="circle"):
    return meta("single_object", {"class": cls, "count": 1})


def counting(cls, n):
    return meta("counting", {"class": cls, "count": n}, exclude=[{"class": cls, "count": n + 1}])


# ---------------------------------------------------------------- object presence and thresholds


def test_single_object_present_and_absent():
    assert score_image(single(), [det("circle")]) == (True, "")
    assert score_image(single(), [det("square")]) == (False, "expected circle>=1, found 0")


@pytest.mark.parametrize(("score", "kept"), [(0.3, False), (0.3001, True), (0.29, False)])
def test_threshold_is_strictly_above_0_3(score, kept):
    assert score_image(single(), [det("circle", score)])[0] is kept


def test_two_object_needs_both():
    metadata = meta("two_object", {"class": "circle", "count": 1}, {"class": "star", "count": 1})
    assert score_image(metadata, [det("circle"), det("star", 0.31)]) == (True, "")
    assert score_image(metadata, [det("circle"), det("star", 0.3)]) == (False, "expected star>=1, found 0")


@pytest.mark.parametrize(("score", "correct"), [(0.9, False), (0.9001, True), (0.5, False)])
def test_counting_threshold_is_strictly_above_0_9(score, correct):
    assert score_image(counting("star", 2), [det("star", 0.99), det("star", score)])[0] is correct


def test_counting_threshold_applies_to_the_counting_tag_only():
    metadata = meta("single_object", {"class": "star", "count": 1})
    assert score_image(metadata, [det("star", 0.5)]) == (True, "")


@pytest.mark.parametrize(("third", "correct"), [(0.9, True), (0.91, False)])
def test_exclude_counts_only_kept_objects(third, correct):
    detections = [det("star", 0.99), det("star", 0.98), det("star", third)]
    ok, reason = score_image(counting("star", 2), detections)
    assert ok is correct
    assert reason == ("" if correct else "expected star<3, found 3")


def test_exclude_count_is_inclusive():
    metadata = meta("counting", {"class": "star", "count": 3}, exclude=[{"class": "star", "count": 4}])
    assert score_image(metadata, [det("star", 0.95)] * 3)[0]
    assert score_image(metadata, [det("star", 0.95)] * 4) == (False, "expected star<4, found 4")
    assert score_image(metadata, [det("star", 0.95)] * 2) == (False, "expected star>=3, found 2")


@pytest.mark.parametrize(("n", "exclude_count", "correct"), [(20, 17, True), (20, 16, False), (15, 16, True)])
def test_at_most_16_objects_per_class(n, exclude_count, correct):
    detections = [det("cross", 0.5 + i / 100) for i in range(n)]
    metadata = meta(
        "two_object", {"class": "cross", "count": 1}, exclude=[{"class": "cross", "count": exclude_count}]
    )
    assert score_image(metadata, detections)[0] is correct


def test_selection_sorts_caps_and_keeps_the_best():
    detections = [det("cross", 0.4 + i / 100) for i in range(20)] + [det("star", 0.2)]
    selected = select_detections(detections, "two_object")
    assert list(selected) == ["cross"]
    scores = [d["score"] for d in selected["cross"]]
    # 0.4 + 4 / 100 is 0.44 up to float64 rounding: approx's default 1e-6 relative
    assert len(scores) == 16 and scores == sorted(scores, reverse=True) and scores[-1] == pytest.approx(0.44)


def test_nms_is_off_by_default_and_official_when_set():
    detections = [det("star", 0.9, (0, 0, 10, 10)), det("star", 0.8, (1, 0, 11, 10))]
    assert len(select_detections(detections, "single_object")["star"]) == 2
    # official IoU counts pixels inclusively: 10 x 11 overlap over 11 x 11 + 11 x 11 - 110 = 0.833
    assert (
        len(select_detections(detections, "single_object", GenEvalSettings(nms_threshold=0.8))["star"]) == 1
    )
    assert (
        len(select_detections(detections, "single_object", GenEvalSettings(nms_threshold=0.85))["star"]) == 2
    )


# ---------------------------------------------------------------- colours


def colors(cls, color, count=1):
    return meta("colors", {"class": cls, "count": count, "color": color})


def test_color_from_the_detection():
    assert score_image(colors("circle", "red"), [det("circle", color="red")]) == (True, "")
    assert score_image(colors("circle", "red"), [det("circle", color="blue")]) == (
        False,
        "expected red circle>=1, found 0 red; and 1 blue",
    )


def test_color_is_checked_on_the_top_count_objects_only():
    detections = [det("circle", 0.9, color="blue"), det("circle", 0.8, color="red")]
    assert score_image(colors("circle", "red"), detections)[0] is False
    assert score_image(colors("circle", "red", count=2), detections) == (
        False,
        "expected red circle>=2, found 1 red; and 1 red, 1 blue",
    )


def test_color_without_classifier_fails_and_classifier_fills_missing_colors():
    detections = [det("circle", 0.9), det("circle", 0.8, color="red")]
    ok, reason = score_image(colors("circle", "red", count=2), detections)
    assert not ok and "1 without colour (no colour classifier)" in reason
    calls = []

    def classify(objects, classname):
        calls.append((len(objects), classname))
        return ["red"] * len(objects)

    assert score_image(colors("circle", "red", count=2), detections, classify) == (True, "")
    assert calls == [(1, "circle")]


def test_color_attr_checks_each_clause():
    metadata = meta(
        "color_attr",
        {"class": "circle", "count": 1, "color": "red"},
        {"class": "star", "count": 1, "color": "green"},
    )
    assert score_image(metadata, [det("circle", color="red"), det("star", color="green")]) == (True, "")
    ok, reason = score_image(metadata, [det("circle", color="green"), det("star", color="red")])
    assert not ok and reason.split("\n") == [
        "expected red circle>=1, found 0 red; and 1 green",
        "expected green star>=1, found 0 green; and 1 red",
    ]


# ---------------------------------------------------------------- position


def position(rel):
    """'a star <rel> a circle': the star (clause 1) is placed relative to the circle (clause 0)."""
    return meta(
        "position", {"class": "circle", "count": 1}, {"class": "star", "count": 1, "position": [rel, 0]}
    )


def at(cls, x, y, w=10.0, h=10.0):
    return det(cls, box=(x - w / 2, y - h / 2, x + w / 2, y + h / 2))


@pytest.mark.parametrize(("dx", "correct"), [(4.0, False), (4.02, True), (20.0, True), (-20.0, False)])
def test_position_direction_threshold_is_strictly_above_0_5(dx, correct):
    # margin 0.1 x (10 + 10) = 2 px: the direction component is (dx - 2) / dx, 0.5 at dx = 4
    ok, reason = score_image(position("right of"), [at("circle", 30, 30), at("star", 30 + dx, 30)])
    assert ok is correct
    if dx == -20.0:
        assert reason == "expected star right of target, found left of target"


def test_position_margin_grows_with_both_boxes():
    circle = at("circle", 30, 30)
    assert score_image(position("right of"), [circle, at("star", 34.02, 30)])[0]
    assert not score_image(position("right of"), [circle, at("star", 34.02, 30, w=10.5)])[0]  # margin 2.05


def test_relative_position_rule():
    box = [25, 25, 35, 35]
    assert relative_position([27, 25, 37, 35], box) == set()  # offset 2 = margin: nothing
    assert relative_position([40, 40, 50, 50], box) == {"right of", "below"}  # (13, 13) / 21.2 = 0.61 each
    assert relative_position([40, 50, 50, 60], box) == {"below"}  # (13, 23) / 29.2 = (0.45, 0.79)
    assert relative_position([25, 5, 35, 15], box) == {"above"}
    assert relative_position([5, 25, 15, 35], box) == {"left of"}
    assert relative_position([27, 25, 37, 35], box, position_threshold=0.0) == {"right of"}


def test_position_needs_a_matched_target():
    ok, reason = score_image(position("right of"), [at("star", 50, 30)])
    assert not ok and reason == "expected circle>=1, found 0\nno target for star to be right of"


def test_position_failure_lists_relations_in_fixed_order():
    ok, reason = score_image(position("above"), [at("circle", 30, 30), at("star", 50, 50)])
    assert not ok and reason == "expected star above target, found right of and below target"


# ---------------------------------------------------------------- summary


def test_summary_is_the_mean_of_tag_means():
    results = [
        {"tag": "counting", "correct": True, "metadata": "a"},
        {"tag": "counting", "correct": False, "metadata": "a"},
        {"tag": "counting", "correct": False, "metadata": "b"},
        {"tag": "colors", "correct": True, "metadata": "c"},
    ]
    summary = summarize(results)
    # means of booleans: exact up to float64 rounding, approx's default 1e-6 relative
    assert summary["geneval_per_tag"] == {"counting": pytest.approx(1 / 3), "colors": 1.0}
    assert summary["geneval"] == pytest.approx((1 / 3 + 1) / 2)
    assert summary["correct_images"] == 0.5
    assert summary["correct_prompts"] == pytest.approx(2 / 3)
    assert summary["geneval_tag_counts"]["counting"] == {"correct": 1, "total": 3}


# ---------------------------------------------------------------- CLIP colour path


def test_color_crop_composites_the_mask_on_999_and_crops_to_the_box():
    image = Image.new("RGB", (20, 20), (200, 10, 10))
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:10, 5:8] = True
    crop = np.asarray(color_crop(image, [4, 4, 12, 10], mask))
    assert crop.shape == (6, 8, 3)
    assert tuple(crop[1, 1]) == (200, 10, 10) and tuple(crop[0, 0]) == (153, 153, 153)
    assert tuple(np.asarray(color_crop(image, [4, 4, 12, 10], None))[0, 0]) == (200, 10, 10)


# A stand-in CLIP with a constructed embedding space: a text embeds as the RGB of its colour word, an image as
# its mean RGB, so each crop's nearest colour by cosine is known by hand.
COLOR_RGB = {"red": (255.0, 0.0, 0.0), "green": (0.0, 255.0, 0.0), "blue": (0.0, 0.0, 255.0)}


class ColorClip(torch.nn.Module):
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens  # color_tokens hands each text's colour RGB

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3))


def color_tokens(texts: list[str]) -> torch.Tensor:
    return torch.tensor([next(COLOR_RGB[w] for w in re.split("[ -]", t) if w in COLOR_RGB) for t in texts])


def mean_preserving_resize(crop: Image.Image) -> torch.Tensor:
    """[3, 16, 16] float32 in [0, 1]; the box filter keeps the mean colour of the crops below."""
    pixels = np.asarray(crop.resize((16, 16), Image.BOX), dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)


def test_clip_color_classifier_takes_the_nearest_colour_embedding():
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, :40], pixels[:, 40:] = (200, 10, 10), (10, 10, 200)  # red left of x = 40, blue right of it
    image = Image.fromarray(pixels)
    right = np.zeros((64, 64), dtype=bool)
    right[:, 40:] = True
    classifier = ClipColorClassifier(
        ColorClip(), mean_preserving_resize, color_tokens, "cpu", batch_size=2, colors=tuple(COLOR_RGB)
    )
    assert torch.equal(classifier.weights("circle"), torch.eye(3))  # templates averaged, L2-normalised
    # Cosines of the crops' mean RGB with red, green, blue, hand-computed: the red corner (0.998, 0.05, 0.05);
    # the blue corner (0.05, 0.05, 0.998); the whole image masked to its blue part on #999 (0.45, 0.45, 0.77);
    # unmasked, the whole image (0.84, 0.07, 0.53). Every winner leads by at least 0.3, against float32
    # rounding of ~1e-6.
    objects = [{"box": [0, 0, 10, 10]}, {"box": [44, 4, 60, 20]}, {"box": [0, 0, 64, 64], "mask": right}]
    assert classifier(image, objects, "circle") == ["red", "blue", "blue"]
    assert classifier(image, [{"box": [0, 0, 64, 64]}], "circle") == ["red"]
    detections = [det("circle", 0.9, (44, 4, 60, 20)), det("circle", 0.8, (0, 0, 10, 10))]
    ok, reason = score_image(
        colors("circle", "blue", count=2), detections, lambda objs, cls: classifier(image, objs, cls)
    )
    assert not ok and reason == "expected blue circle>=2, found 1 blue; and 1 red, 1 blue"


def test_clip_color_classifier_runs_an_open_clip_model(tmp_path):
    """The classifier on a tiny random open_clip model: the interface only, its colours are arbitrary."""
    open_clip = pytest.importorskip("open_clip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "arrag-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "arrag-tiny-clip.json")
    model, _, preprocess = open_clip.create_model_and_transforms("arrag-tiny-clip", pretrained=None)
    classifier = ClipColorClassifier(
        model, preprocess, open_clip.get_tokenizer("arrag-tiny-clip"), "cpu", batch_size=2
    )
    image = Image.new("RGB", (64, 64), (200, 10, 10))
    objects = [
        {"box": [0, 0, 10, 10]},
        {"box": [5, 5, 30, 30], "mask": np.ones((64, 64), dtype=bool)},
        {"box": [1, 2, 3, 4]},
    ]
    names = classifier(image, objects, "circle")
    assert len(names) == 3 and set(names) <= set(COLORS)
    assert tuple(classifier.weights("circle").shape) == (16, len(COLORS))


# ---------------------------------------------------------------- CLI on a generated folder


def render_prompt(row: dict, rng: np.random.Generator) -> Image.Image:
    """A 64 x 64 Shapes render satisfying a GenEval metadata row (position: clause 1 `rel` clause 0)."""
    while True:
        specs = [
            (req["class"], req.get("color", str(rng.choice(list(SHAPES_COLORS)))), rng.uniform(12.8, 19.2))
            for req in row["include"]
            for _ in range(req["count"])
        ]
        relation = None
        if row["tag"] == "position":
            specs, relation = [specs[1], specs[0]], (0, row["include"][1]["position"][0], 1)
        objects = place_objects(rng, specs, 64, relation)
        if objects:
            return render(Scene("light", objects, relation), 64)[0]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """GenEval layout: one prompt per tag, two samples each; prompt 4 (position) expects the wrong side."""
    root = tmp_path_factory.mktemp("geneval")
    write_vocabulary(root / "vocabulary.json", 64)
    rng = np.random.default_rng(0)
    rows = geneval_metadata(ShapesConfig(), per_tag=1)
    for index, row in enumerate(rows):
        folder = root / "gen" / f"{index:05d}"
        (folder / "samples").mkdir(parents=True)
        for k in range(2):
            render_prompt(row, rng).save(folder / "samples" / f"{k:04d}.png")
        if row["tag"] == "position":
            flipped = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
            row = {
                **row,
                "include": [
                    row["include"][0],
                    {**row["include"][1], "position": [flipped[row["include"][1]["position"][0]], 0]},
                ],
            }
        (folder / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    Image.new("RGB", (128, 128)).save(root / "gen" / "00000" / "grid.png")  # ignored, as officially
    return root


def test_cli_scores_a_generated_folder(generated, tmp_path, capsys):
    out = tmp_path / "geneval.json"
    assert (
        main(
            [
                "geneval",
                str(generated / "gen"),
                "--backend",
                "shapes",
                "--vocabulary",
                str(generated / "vocabulary.json"),
                "--out",
                str(out),
                "--json",
                "--seed",
                "3",
                "--config-hash",
                "abc",
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == record
    assert record["metric"] == "geneval" and record["seed"] == 3 and record["config_hash"] == "abc"
    assert record["n_images"] == {"images": 12, "prompts": 6}
    assert record["geneval_per_tag"] == {
        "single_object": 1.0,
        "two_object": 1.0,
        "counting": 1.0,
        "colors": 1.0,
        "position": 0.0,
        "color_attr": 1.0,
    }
    assert record["geneval"] == pytest.approx(5 / 6)  # a mean of 0s and 1s: float64 rounding only
    assert record["settings"]["threshold"] == 0.3 and record["settings"]["counting_threshold"] == 0.9
    assert record["settings"]["max_objects"] == 16 and record["settings"]["color_source"] == "detector"
    assert len(record["inputs"]["gen_files_sha256"]) == 64 and record["inputs"]["vocabulary_sha256"]
    for key in ("versions", "git_commit", "python", "created", "weights_sha256"):
        assert key in record
    lines = [json.loads(line) for line in (tmp_path / "geneval.results.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and lines[0]["filename"] == "00000/samples/0000.png"
    wrong = [r for r in lines if not r["correct"]]
    assert {r["tag"] for r in wrong} == {"position"} and all("target, found" in r["reason"] for r in wrong)
    assert set(json.loads(lines[0]["details"])) == {json.loads(lines[0]["metadata"])["include"][0]["class"]}


def test_cli_names_an_undecodable_image(generated, tmp_path):
    bad = tmp_path / "gen"
    (bad / "00000" / "samples").mkdir(parents=True)
    (bad / "00000" / "metadata.jsonl").write_text(
        (generated / "gen" / "00000" / "metadata.jsonl").read_text()
    )
    (bad / "00000" / "samples" / "0000.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="0000.png"):
        main(["geneval", str(bad), "--vocabulary", str(generated / "vocabulary.json"), "--json"])


def test_cli_validates_the_shapes_detector(generated, tmp_path):
    write_split(tmp_path / "split", "heldout", 40, ShapesConfig())
    out = tmp_path / "validation.json"
    main(
        [
            "geneval",
            "--validate-shapes",
            str(tmp_path / "split"),
            "--vocabulary",
            str(generated / "vocabulary.json"),
            "--out",
            str(out),
        ]
    )
    record = json.loads(out.read_text())
    assert record["n_images"] == 40 and record["settings"]["mode"] == "validate-shapes"
    # measured 1.0 and 1.0 on these 76 objects (numpy only, the same at any thread count); the floor allows two misses
    assert record["shapes_detector_precision"] >= 0.97 and record["shapes_detector_recall"] >= 0.97
