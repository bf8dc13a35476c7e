"""Generation: official layouts, and images that do not depend on shard count or on resuming after a kill."""

import hashlib
import json

import pytest
import torch
from PIL import Image

import arrag.generate as generation
from arrag.benchmarks import prompt_items, stratified_subset
from arrag.generate import generate_shard
from arrag.models.janus import SamplingConfig, build_tiny_backbone
from arrag.records import gather_records
from arrag.shapes.benchmarks import BenchmarkSizes, write_benchmarks
from arrag.shapes.dataset import ShapesConfig, write_split

SAMPLING = SamplingConfig(cfg_weight=3.0)
WORLD = ShapesConfig(seed=5, image_size=16)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    heldout = write_split(root / "heldout", "heldout", 10, WORLD)
    write_benchmarks(root / "bench", WORLD, BenchmarkSizes(geneval_per_tag=1, dpg_prompts=3, mjhq_images=8),
                     root / "heldout", heldout)
    return root / "bench"


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_tiny_backbone(["a photo of a red circle and two blue squares left of"], image_size=16, patch_size=8,
                               codebook_size=32, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def prompts_of(bench, benchmark):
    return {"geneval": bench / "geneval" / "evaluation_metadata.jsonl", "dpg": bench / "dpg_bench" / "prompts",
            "mjhq": bench / "mjhq" / "meta_data.json", "mjhq_ablation": bench / "mjhq" / "meta_data.json"}[benchmark]


def run(backbone, bench, benchmark, images, shards, micro_batch=3):
    return [generate_shard(backbone, benchmark, prompts_of(bench, benchmark), images, shard, shards, seed=1,
                           sampling=SAMPLING, micro_batch=micro_batch, samples_per_prompt=2, ablation_subset=4)
            for shard in range(shards)]


def digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# A micro-batch holds the same images whatever the shard count or resume point (see arrag.generate): the images come
# from the same computations in the same batches, so the files are byte-identical by construction, not by luck of
# rounding.
@pytest.mark.parametrize("benchmark", ["geneval", "dpg", "mjhq"])
def test_shard_count_does_not_change_the_images(backbone, bench, tmp_path, benchmark):
    run(backbone, bench, benchmark, tmp_path / "one", shards=1)
    run(backbone, bench, benchmark, tmp_path / "three", shards=3)
    assert digests(tmp_path / "one") == digests(tmp_path / "three")


def test_resuming_after_a_kill_gives_byte_identical_files(backbone, bench, tmp_path, monkeypatch):
    run(backbone, bench, "geneval", tmp_path / "straight", shards=1)
    real_write, calls = generation.write_batch, []

    def dying_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the middle of the shard
        return real_write(*args, **kwargs)

    monkeypatch.setattr(generation, "write_batch", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(backbone, bench, "geneval", tmp_path / "resumed", shards=1)
    monkeypatch.setattr(generation, "write_batch", real_write)
    assert 0 < len(digests(tmp_path / "resumed")) < len(digests(tmp_path / "straight"))
    (record,) = run(backbone, bench, "geneval", tmp_path / "resumed", shards=1)
    assert record["images_skipped"] == 3 and record["images_generated"] == 12 - 3 and record["images_timed"] == 12
    assert digests(tmp_path / "resumed") == digests(tmp_path / "straight")
    assert not list((tmp_path / "resumed").rglob("*.tmp"))


def test_layouts_are_the_official_ones(backbone, bench, tmp_path):
    run(backbone, bench, "geneval", tmp_path / "geneval", shards=2)
    metadata = [json.loads(line) for line in (bench / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines()]
    for index, row in enumerate(metadata):
        folder = tmp_path / "geneval" / f"{index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == row
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
    run(backbone, bench, "dpg", tmp_path / "dpg", shards=2)
    grids = sorted((tmp_path / "dpg").iterdir())
    assert [p.stem for p in grids] == sorted(p.stem for p in (bench / "dpg_bench" / "prompts").iterdir())
    assert Image.open(grids[0]).size == (32, 32)  # 2x2 grid of 16x16 samples
    run(backbone, bench, "mjhq_ablation", tmp_path / "mjhq", shards=2)
    subset = stratified_subset(prompt_items("mjhq", prompts_of(bench, "mjhq")), 4, seed=1)
    assert sorted(digests(tmp_path / "mjhq")) == sorted(f"{item.category}/{item.id}.png" for item in subset)


def test_gather_merges_shard_records_and_refuses_overlaps(backbone, bench, tmp_path):
    records = run(backbone, bench, "mjhq", tmp_path / "images", shards=2)
    paths = []
    for k, record in enumerate(records):
        paths.append(tmp_path / f"{k}.json")
        paths[-1].write_text(json.dumps(record))
    merged = gather_records(paths, tmp_path / "record.json", tmp_path / "images")
    assert merged["images"] == 8 and merged["images_generated"] == 8 and merged["shards"] == 2
    rerun = run(backbone, bench, "mjhq", tmp_path / "images", shards=2)  # everything reused: timings are kept
    assert sum(r["images_generated"] for r in rerun) == 0 and sum(r["images_timed"] for r in rerun) == 8
    # the same timing files; shard and merged records round to 4 decimals: < 1e-4 apart, 1e-3 leaves 10x
    assert sum(r["generation_seconds"] for r in rerun) == pytest.approx(merged["generation_seconds"], abs=1e-3)
    assert merged["seconds_per_image"] > 0
    assert (tmp_path / "sample_grid.png").is_file()
    with pytest.raises(ValueError, match="shards overlap"):
        gather_records([paths[0], paths[0]], tmp_path / "again.json", tmp_path / "images")
