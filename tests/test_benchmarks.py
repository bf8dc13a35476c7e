"""Benchmark files: the Shapes ones in the official formats, read by the same loaders as the real ones."""

import csv
import json
from collections import Counter

import pytest

from arrag.benchmarks import (
    DPG_COLUMNS,
    GENEVAL_TAGS,
    PromptItem,
    load_dpg_prompts,
    load_dpg_questions,
    load_geneval_metadata,
    load_mjhq_meta,
    prompt_items,
    stratified_subset,
)
from arrag.shapes.benchmarks import BenchmarkSizes, geneval_candidates, write_benchmarks
from arrag.shapes.dataset import ShapesConfig, read_annotations, write_split
from arrag.shapes.vocab import CLASSES, COLORS, PLURALS

CONFIG = ShapesConfig(seed=3)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    heldout = write_split(root / "heldout", "heldout", 30, CONFIG)
    write_benchmarks(root / "out", CONFIG, BenchmarkSizes(geneval_per_tag=5, dpg_prompts=6, mjhq_images=20),
                     root / "heldout", heldout)
    return root / "out"


def test_real_geneval_metadata_parses(shared_benchmarks):
    rows = load_geneval_metadata(shared_benchmarks / "geneval" / "evaluation_metadata.jsonl")
    assert len(rows) == 553
    assert Counter(r["tag"] for r in rows) == {"position": 100, "color_attr": 100, "two_object": 99,
                                                "colors": 94, "single_object": 80, "counting": 80}
    items = prompt_items("geneval", shared_benchmarks / "geneval" / "evaluation_metadata.jsonl")
    assert items[0].id == "00000" and items[-1].id == "00552"


def test_real_dpg_prompts_parse(shared_benchmarks):
    prompts = load_dpg_prompts(shared_benchmarks / "dpg_bench" / "prompts")
    assert len(prompts) == 1065
    assert all(text for text in prompts.values())
    assert prompts["0"].startswith("An expansive field")


def test_shapes_geneval_has_every_tag_and_the_real_schema(bench, shared_benchmarks):
    rows = load_geneval_metadata(bench / "geneval" / "evaluation_metadata.jsonl")
    assert Counter(r["tag"] for r in rows) == {tag: 5 for tag in GENEVAL_TAGS}
    real = load_geneval_metadata(shared_benchmarks / "geneval" / "evaluation_metadata.jsonl")
    real_keys = {k for r in real for k in r}
    real_object_keys = {k for r in real for o in r["include"] for k in o}
    assert {k for r in rows for k in r} == real_keys
    assert {k for r in rows for o in r["include"] for k in o} == real_object_keys
    for row in rows:
        for obj in row["include"]:
            assert obj["class"] in CLASSES and obj.get("color", "red") in COLORS
        if row["tag"] == "counting":
            assert row["exclude"] == [{"class": row["include"][0]["class"], "count": row["include"][0]["count"] + 1}]
        if row["tag"] == "position":
            assert row["include"][1]["position"][1] == 0
    names = (bench / "geneval" / "object_names.txt").read_text().split("\n")
    assert names[: len(CLASSES)] == list(CLASSES)


def test_geneval_candidates_are_distinct():
    for tag in GENEVAL_TAGS:
        prompts = [c["prompt"] for c in geneval_candidates(tag)]
        assert len(prompts) == len(set(prompts))
    assert "a photo of an orange star" in {c["prompt"] for c in geneval_candidates("colors")}


def test_shapes_dpg_csv_has_official_columns_and_valid_dependencies(bench):
    with open(bench / "dpg_bench" / "dpg_bench.csv", newline="") as handle:
        assert tuple(csv.DictReader(handle).fieldnames) == DPG_COLUMNS
    prompts = load_dpg_prompts(bench / "dpg_bench" / "prompts")
    questions = load_dpg_questions(bench / "dpg_bench" / "dpg_bench.csv")
    assert set(prompts) == set(questions) and len(prompts) == 6
    for item_id, rows in questions.items():
        assert [r["proposition_id"] for r in rows] == list(range(1, len(rows) + 1))
        for row in rows:
            assert row["text"] == prompts[item_id]
            parents = [int(p) for p in row["dependency"].split(",")]
            assert all(0 <= p < row["proposition_id"] for p in parents)
            assert row["category_broad"] in {"entity", "attribute", "relation", "global", "other"}
        assert {"entity", "attribute", "relation", "global"} <= {r["category_broad"] for r in rows}


def test_dpg_truth_renders_agree_with_questions(bench):
    truth = {r["id"]: r for r in read_annotations(bench / "dpg_bench" / "truth")}
    questions = load_dpg_questions(bench / "dpg_bench" / "dpg_bench.csv")
    for item_id, rows in questions.items():
        objects = truth[item_id]["objects"]
        classes = Counter(o["class"] for o in objects)
        for row in rows:
            if row["category_detailed"] == "count":
                noun, count = row["tuple"].split("(")[1].rstrip(")").split(", ==")
                singular = {PLURALS[c]: c for c in CLASSES}[noun]
                assert classes[singular] == int(count)
            if row["category_detailed"] == "spatial":
                assert truth[item_id]["relation"][1] in row["tuple"]


def test_shapes_mjhq_meta_and_reference_images(bench):
    meta = load_mjhq_meta(bench / "mjhq" / "meta_data.json")
    assert len(meta) == 20
    for image_id, entry in meta.items():
        assert (bench / "mjhq" / "images" / entry["category"] / f"{image_id}.png").is_file()
    items = prompt_items("mjhq", bench / "mjhq" / "meta_data.json")
    assert {i.category for i in items} <= set(CLASSES)


def test_vocabulary_file_is_plain_data(bench):
    vocab = json.loads((bench / "vocabulary.json").read_text())
    assert vocab["classes"] == list(CLASSES)
    assert vocab["colors"]["red"] == list(COLORS["red"])
    assert vocab["image_size"] == 64


def test_loader_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "evaluation_metadata.jsonl"
    bad.write_text('{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}\n'
                   '{"tag": "shapes", "include": [], "prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"evaluation_metadata.jsonl:2: tag 'shapes'"):
        load_geneval_metadata(bad)
    csv_file = tmp_path / "q.csv"
    csv_file.write_text("item_id,text\nA,b\n")
    with pytest.raises(ValueError, match="q.csv: missing DPG-Bench columns"):
        load_dpg_questions(csv_file)
    with pytest.raises(ValueError, match="mjhq_images = 5 exceeds the held-out split"):
        write_benchmarks(tmp_path / "o", CONFIG, BenchmarkSizes(1, 1, 5), tmp_path, [])


def test_the_ablation_subset_is_stratified_by_category_seeded_and_in_file_order():
    items = [PromptItem(f"{c}{i}", "p", c) for c, n in (("b", 3), ("a", 6), ("c", 1)) for i in range(n)]
    subset = stratified_subset(items, 5, seed=0)
    # shares 3 (a), 1.5 (b), 0.5 (c): floors 3 + 1 + 0, the one left over to the larger remainder, b before c by name
    assert Counter(item.category for item in subset) == {"a": 3, "b": 2}
    assert subset == [item for item in items if item in subset]  # file order
    assert stratified_subset(items, 5, seed=0) == subset
    assert {tuple(stratified_subset(items, 5, seed=s)) for s in range(10)} != {tuple(subset)}  # the seed samples
    assert stratified_subset(items, 10, seed=3) == items and stratified_subset(items, 99, seed=3) == items
