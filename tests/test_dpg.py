"""DPG-Bench: dependency propagation, crop and category scoring, the official-quirks switch, the Shapes
VQA against ground truth, and the CLI on 2x2 grids of truth renders. Scores are means of 0/1 answers:
pytest.approx, with its default 1e-6 relative, absorbs their float64 rounding."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from arrag.shapes.benchmarks import write_dpg
from arrag.shapes.dataset import ShapesConfig
from arrag.shapes.vocab import write_vocabulary
from evaluators.__main__ import main
from evaluators.dpg import (
    MissingParentError,
    ShapesVQA,
    categories,
    dependency_scores,
    grid_crops,
    load_questions,
    score_image,
    score_prompt,
    summarize,
    validate_shapes_vqa,
)
from evaluators.shapes_detector import load_vocabulary


def q(pid, dependency="0", tuple_text="entity - whole (x)"):
    return {"proposition_id": pid, "dependency": dependency, "tuple": tuple_text}


def answers(*yes):
    return {pid: bool(value) for pid, value in enumerate(yes, start=1)}


# Shapes-style prompt: entity 1, its colour 2; entity 3, its colour 4; relation of 1 and 3; background 6
PROMPT = [q(1), q(2, "1"), q(3), q(4, "3"), q(5, "1,3"), q(6)]


def test_all_yes_scores_one():
    assert score_prompt(PROMPT, answers(1, 1, 1, 1, 1, 1)) == 1.0


def test_a_no_parent_zeroes_its_children():
    # 1 no -> 2 and 5 zero; 3, 4, 6 yes: 3 / 6
    assert score_prompt(PROMPT, answers(0, 1, 1, 1, 1, 1)) == 0.5
    assert dependency_scores(PROMPT, answers(0, 1, 1, 1, 1, 1)) == {1: 0, 2: 0, 3: 1, 4: 1, 5: 0, 6: 1}


def test_multi_parent_dependency_needs_every_parent():
    # 3 no -> 4 and 5 zero (5 depends on 1 and 3): 1, 2, 6 yes
    assert score_prompt(PROMPT, answers(1, 1, 0, 1, 1, 1)) == 0.5
    assert score_prompt(PROMPT, answers(1, 1, 1, 1, 0, 1)) == pytest.approx(5 / 6)


def test_zeroing_propagates_down_a_chain_in_csv_order():
    chain = [q(1), q(2, "1"), q(3, "2"), q(4, "3")]
    assert score_prompt(chain, answers(0, 1, 1, 1)) == 0.0
    assert score_prompt(chain, answers(1, 0, 1, 1)) == 0.25
    assert score_prompt(chain, answers(1, 1, 1, 0)) == 0.75


def test_one_pass_a_later_parent_counts_with_its_raw_answer():
    # 1 depends on 2 (later in the CSV), 2 on 3: when 1 is visited, 2 still holds its raw yes
    backwards = [q(1, "2"), q(2, "3"), q(3)]
    assert dependency_scores(backwards, answers(1, 1, 0)) == {1: 1, 2: 0, 3: 0}
    assert score_prompt(backwards, answers(1, 1, 0)) == pytest.approx(1 / 3)


def test_a_missing_parent_is_an_error():
    with pytest.raises(MissingParentError, match="depends on 1"):
        score_prompt([q(2, "1"), q(3)], {2: True, 3: True})


def test_crop_image_and_category_scores():
    crops = [answers(1, 1, 1, 1, 1, 1), answers(0, 1, 1, 1, 1, 1)]
    score, crop_scores, per_question = score_image(PROMPT, crops)
    assert crop_scores == [1.0, 0.5] and score == 0.75
    assert per_question == {1: 0.5, 2: 0.5, 3: 1.0, 4: 1.0, 5: 0.5, 6: 1.0}
    # official: categories from the last crop's raw answers, before zeroing
    _, _, quirky = score_image(PROMPT, crops, official_quirks=True)
    assert quirky == {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0}


def test_categories_and_summary():
    assert categories(q(1, tuple_text="attribute - color (circle, red)")) == (
        "attribute",
        "attribute - color",
    )
    assert categories(q(1, tuple_text="global - (light background)")) == ("global", "global -")
    summary = summarize(
        [1.0, 0.5],
        [
            ("entity", "entity - whole", 1.0),
            ("entity", "entity - part", 0.0),
            ("entity", "entity - whole", 1.0),
            ("global", "global -", 0.5),
        ],
    )
    assert summary["dpg"] == 75.0
    assert summary["dpg_l1"] == {"entity": pytest.approx(200 / 3), "global": 50.0}
    assert summary["dpg_l2"] == {"entity - part": 0.0, "entity - whole": 100.0, "global -": 50.0}


def test_grid_crops_order_and_resolution():
    grid = Image.new("RGB", (8, 8))
    for k, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        grid.paste(Image.new("RGB", (4, 4), color), ((k % 2) * 4, (k // 2) * 4))
    crops = grid_crops(grid, None, 4)
    assert [c.getpixel((0, 0)) for c in crops] == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    assert [c.size for c in crops] == [(4, 4)] * 4
    assert len(grid_crops(grid, 2, 1)) == 1 and grid_crops(grid, 2, 1)[0].size == (2, 2)
    with pytest.raises(ValueError, match="2x2 grid"):
        grid_crops(grid, 5, 4)


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(
            handle,
            fieldnames=[
                "item_id",
                "text",
                "keywords",
                "proposition_id",
                "dependency",
                "category_broad",
                "category_detailed",
                "tuple",
                "question_natural_language",
            ],
        )
        writer.writeheader()
        for item, pid, dep in rows:
            writer.writerow(
                {
                    "item_id": item,
                    "text": "t",
                    "keywords": "k",
                    "proposition_id": pid,
                    "dependency": dep,
                    "category_broad": "entity",
                    "category_detailed": "whole",
                    "tuple": "entity - whole (x)",
                    "question_natural_language": f"q{pid}?",
                }
            )


def test_load_questions_and_the_official_first_row_drop(tmp_path):
    path = tmp_path / "dpg.csv"
    write_csv(path, [("a", 1, "0"), ("a", 2, "1"), ("b", 1, "0"), ("b", 2, "1")])
    questions = load_questions(path)
    assert [r["proposition_id"] for r in questions["a"]] == [1, 2] and questions["b"][1]["dependency"] == "1"
    quirky = load_questions(path, official_quirks=True)
    assert [r["proposition_id"] for r in quirky["a"]] == [2] and len(quirky["b"]) == 2
    write_csv(path, [("a", 1, "0"), ("a", 2, "3")])
    with pytest.raises(ValueError, match="item a question 2 depends on"):
        load_questions(path)


# ---------------------------------------------------------------- Shapes VQA and CLI


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpg")
    write_dpg(root, ShapesConfig(), 8)
    write_vocabulary(root / "vocabulary.json", 64)
    return root


@pytest.fixture(scope="module")
def vqa(bench):
    return ShapesVQA(load_vocabulary(bench / "vocabulary.json"))


def test_shapes_vqa_answers_every_truth_question_yes(bench, vqa):
    questions = load_questions(bench / "dpg_bench" / "dpg_bench.csv")
    report = validate_shapes_vqa(bench / "dpg_bench" / "truth", questions, vqa)
    assert report["n_questions"] == sum(len(v) for v in questions.values())
    assert report["accuracy"] == 1.0, report["wrong"]


def test_shapes_vqa_says_no_to_false_statements(bench, vqa):
    truth = [
        json.loads(line)
        for line in (bench / "dpg_bench" / "truth" / "annotations.jsonl").read_text().splitlines()
    ]
    record = truth[0]
    image = Image.open(bench / "dpg_bench" / "truth" / "images" / f"{record['id']}.png")
    (a, rel, b), objects = record["relation"], record["objects"]
    other_background = next(n for n in ("light", "dark", "sand") if n != record["background"])
    other_color = next(c for c in ("red", "blue") if c != objects[a]["color"])
    absent = next(
        c
        for c in ("circle", "square", "triangle", "diamond", "star", "cross")
        if c not in {o["class"] for o in objects}
    )
    flipped = {
        "left of": "to the right of",
        "right of": "to the left of",
        "above": "below",
        "below": "above",
    }[rel]
    questions = [
        f"Is the background {other_background}?",
        f"Is the {objects[a]['class']} {other_color}?",
        f"Is there a {absent}?",
        f"Is the {objects[a]['class']} {flipped} the {objects[b]['class']}?",
        f"Are there four {vqa.vocabulary.plurals[objects[a]['class']]}?",
    ]
    assert vqa.answer(image, questions) == ["no"] * 5
    with pytest.raises(ValueError, match="cannot parse"):
        vqa.answer(image, ["Is the circle happy?"])


def make_grids(bench, out, blank_cell_of=None):
    """2x2 grids of each truth render; the bottom-right cell of `blank_cell_of` is plain background."""
    out.mkdir(parents=True)
    for path in sorted((bench / "dpg_bench" / "truth" / "images").glob("*.png")):
        cell = Image.open(path).convert("RGB")
        grid = Image.new("RGB", (128, 128))
        for k in range(4):
            blank = path.stem == blank_cell_of and k == 3
            grid.paste(
                Image.new("RGB", (64, 64), cell.getpixel((0, 0))) if blank else cell,
                ((k % 2) * 64, (k // 2) * 64),
            )
        grid.save(out / path.name)


def test_cli_scores_grids_of_truth_renders(bench, tmp_path):
    make_grids(bench, tmp_path / "gen", blank_cell_of="shapes0003")
    out = tmp_path / "dpg.json"
    args = [
        "dpg",
        str(tmp_path / "gen"),
        "--questions",
        str(bench / "dpg_bench" / "dpg_bench.csv"),
        "--backend",
        "shapes",
        "--vocabulary",
        str(bench / "vocabulary.json"),
        "--seed",
        "1",
        "--config-hash",
        "h",
    ]
    assert main([*args, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    n_questions = len(load_questions(bench / "dpg_bench" / "dpg_bench.csv")["shapes0003"])
    # the blank cell answers only the background question yes
    assert record["dpg"] == pytest.approx(100 * (7 + (3 + 1 / n_questions) / 4) / 8)
    assert record["n_images"] == {"images": 8, "scored": 8} and record["failed"] == []
    assert {"entity", "attribute", "relation", "global"} <= set(record["dpg_l1"])
    assert record["dpg_l1"]["global"] == 100.0 and record["dpg_l1"]["entity"] < 100.0
    assert record["settings"]["official_quirks"] is False and record["settings"]["pic_num"] == 4
    assert (
        record["seed"] == 1
        and record["config_hash"] == "h"
        and len(record["inputs"]["gen_files_sha256"]) == 64
    )
    lines = (tmp_path / "dpg.results.jsonl").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[3])["crop_scores"][3] == pytest.approx(1 / n_questions)

    quirky = tmp_path / "quirky.json"
    assert main([*args, "--official-quirks", "--out", str(quirky)]) == 0
    record = json.loads(quirky.read_text())
    # the first prompt lost its first question, on which question 2 depends: the image fails, as officially
    assert [f["item_id"] for f in record["failed"]] == ["shapes0000"]
    assert record["n_images"] == {"images": 8, "scored": 7}
    assert record["dpg"] == pytest.approx(100 * (6 + (3 + 1 / n_questions) / 4) / 7)
    # categories from the last (blank) crop's raw answers: entity questions of shapes0003 count 0
    assert record["dpg_l1"]["entity"] < 100.0

    # one set of answers serves both modes: each record holds the other mode's scores, equal to that mode's own run
    corrected = json.loads(out.read_text())
    assert corrected["other_mode"]["official_quirks"] is True and record["other_mode"]["official_quirks"] is False
    for other, own in ((corrected["other_mode"], record), (record["other_mode"], corrected)):
        assert other["dpg"] == pytest.approx(own["dpg"]) and other["failed"] == own["failed"]
        assert other["dpg_l1"] == pytest.approx(own["dpg_l1"]) and other["dpg_l2"] == pytest.approx(own["dpg_l2"])


def test_cli_validates_the_shapes_vqa(bench, tmp_path):
    out = tmp_path / "validation.json"
    main(
        [
            "dpg",
            "--validate-shapes",
            str(bench / "dpg_bench" / "truth"),
            "--questions",
            str(bench / "dpg_bench" / "dpg_bench.csv"),
            "--vocabulary",
            str(bench / "vocabulary.json"),
            "--out",
            str(out),
        ]
    )
    record = json.loads(out.read_text())
    assert record["shapes_vqa_accuracy"] == 1.0 and record["n_images"] == 8


def test_cli_rejects_an_image_without_questions(bench, tmp_path):
    (tmp_path / "gen").mkdir()
    Image.new("RGB", (128, 128)).save(tmp_path / "gen" / "unknown.png")
    with pytest.raises(ValueError, match="unknown.png"):
        main(
            [
                "dpg",
                str(tmp_path / "gen"),
                "--questions",
                str(bench / "dpg_bench" / "dpg_bench.csv"),
                "--vocabulary",
                str(bench / "vocabulary.json"),
                "--json",
            ]
        )


def test_transformers_vqa_with_a_tiny_blip(bench, tmp_path):
    transformers = pytest.importorskip("transformers")
    from evaluators.dpg import TransformersVQA

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes", "no", "is", "there", "a", "circle", "?"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    processor = transformers.BlipProcessor(
        image_processor=transformers.BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=transformers.BertTokenizer(str(tmp_path / "vocab.txt")),
    )
    config = transformers.BlipConfig(
        text_config={
            "vocab_size": len(words),
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
            "encoder_hidden_size": 32,
            "bos_token_id": 2,
            "sep_token_id": 3,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 32,
            "patch_size": 16,
        },
        projection_dim=32,
    )
    transformers.BlipForQuestionAnswering(config).save_pretrained(tmp_path / "blip")
    processor.save_pretrained(tmp_path / "blip")
    vqa = TransformersVQA(str(tmp_path / "blip"), "cpu", max_new_tokens=3)
    replies = vqa.answer(
        Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)), ["is there a circle?", "is there a?"]
    )
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    make_grids(bench, tmp_path / "gen")
    out = tmp_path / "dpg.json"
    args = ["dpg", str(tmp_path / "gen"), "--questions", str(bench / "dpg_bench" / "dpg_bench.csv")]
    main(
        [
            *args,
            "--backend",
            "transformers",
            "--vqa-model",
            str(tmp_path / "blip"),
            "--device",
            "cpu",
            "--pic-num",
            "1",
            "--out",
            str(out),
        ]
    )
    record = json.loads(out.read_text())
    assert 0 <= record["dpg"] <= 100 and record["n_images"] == {"images": 8, "scored": 8}
    assert record["settings"]["backend"] == "transformers" and record["settings"]["pic_num"] == 1
    assert list(record["weights_sha256"]) == ["model.safetensors"]
