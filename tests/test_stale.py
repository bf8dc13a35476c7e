"""No stale results: a generation folder reuses an image only when the same models, settings and code made it,
and a rule's code hash covers the source it runs and nothing else."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

import arrag.codehash as codehash
import arrag.generate as generation
from arrag.generate import generate_shard, inputs_sha256
from arrag.models.janus import SamplingConfig, build_tiny_backbone, load_backbone
from arrag.shapes.benchmarks import BenchmarkSizes, write_benchmarks
from arrag.shapes.dataset import ShapesConfig, write_split

WORLD = ShapesConfig(seed=5, image_size=16)
SAMPLING = SamplingConfig(cfg_weight=3.0)


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    root = tmp_path_factory.mktemp("stale")
    heldout = write_split(root / "heldout", "heldout", 10, WORLD)
    write_benchmarks(root / "bench", WORLD, BenchmarkSizes(geneval_per_tag=1, dpg_prompts=2, mjhq_images=6),
                     root / "heldout", heldout)
    return root / "bench" / "mjhq" / "meta_data.json"


def save_backbone(folder, seed):
    torch.manual_seed(seed)
    build_tiny_backbone(["a photo of a red circle and two blue squares left of"], image_size=16, patch_size=8,
                        codebook_size=32, hidden_size=32, num_layers=2, num_heads=2,
                        intermediate_size=64).save_pretrained(folder)
    return load_backbone(str(folder))


def generate(backbone, meta, images, sampling=SAMPLING, **kwargs):
    return generate_shard(backbone, "mjhq", meta, images, 0, 1, seed=1, sampling=sampling, micro_batch=4, **kwargs)


def digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))}


def test_the_same_models_settings_and_code_reuse_every_image(meta, tmp_path):
    backbone = save_backbone(tmp_path / "backbone", 0)
    first = generate(backbone, meta, tmp_path / "images")
    again = generate(backbone, meta, tmp_path / "images")
    assert first["images_generated"] == 6 and again["images_generated"] == 0 and again["images_skipped"] == 6
    assert again["fingerprint"] == first["fingerprint"]


def test_changed_backbone_weights_regenerate_every_image(meta, tmp_path):
    images = tmp_path / "images"
    first = generate(save_backbone(tmp_path / "backbone", 0), meta, images)
    before = digests(images)
    rerun = generate(save_backbone(tmp_path / "backbone", 1), meta, images)  # same folder, other weights
    assert rerun["model"]["weights_sha256"] != first["model"]["weights_sha256"]
    assert rerun["images_generated"] == 6 and rerun["fingerprint"] != first["fingerprint"]
    assert digests(images) != before and set(digests(images)) == set(before)


def test_a_changed_sampling_setting_regenerates_every_image(meta, tmp_path):
    backbone = save_backbone(tmp_path / "backbone", 0)
    generate(backbone, meta, tmp_path / "images")
    before = digests(tmp_path / "images")
    rerun = generate(backbone, meta, tmp_path / "images", sampling=SamplingConfig(cfg_weight=3.0, temperature=0.5))
    assert rerun["images_generated"] == 6 and digests(tmp_path / "images") != before


def test_a_changed_source_or_method_input_regenerates_every_image(meta, tmp_path, monkeypatch):
    backbone = save_backbone(tmp_path / "backbone", 0)
    generate(backbone, meta, tmp_path / "images")
    assert generate(backbone, meta, tmp_path / "images", inputs={"index": "0" * 64})["images_generated"] == 6
    monkeypatch.setattr(generation, "code_hash", lambda step: "another source")
    assert generate(backbone, meta, tmp_path / "images", inputs={"index": "0" * 64})["images_generated"] == 6


def test_images_the_prompts_no_longer_ask_for_are_removed(meta, tmp_path):
    backbone = save_backbone(tmp_path / "backbone", 0)
    run = generate_shard(backbone, "mjhq_ablation", meta, tmp_path / "images", 0, 1, seed=1, sampling=SAMPLING,
                         micro_batch=4, ablation_subset=5)
    fewer = generate_shard(backbone, "mjhq_ablation", meta, tmp_path / "images", 0, 1, seed=1, sampling=SAMPLING,
                           micro_batch=4, ablation_subset=3)
    assert len(run["files"]) == 5 and sorted(digests(tmp_path / "images")) == sorted(fewer["files"])


def test_an_index_input_is_hashed_with_its_sidecars(tmp_path):
    index = tmp_path / "index.tokens"
    index.write_bytes(b"lists")
    (tmp_path / "index.tokens.json").write_text('{"patches": 1}')
    (tmp_path / "other.json").write_text("{}")
    hashes = inputs_sha256({"index": index, "weights": [tmp_path / "missing-hub-id"]})
    assert sorted(hashes) == ["index", "index.json"]
    (tmp_path / "index.tokens.json").write_text('{"patches": 2}')
    assert inputs_sha256({"index": index})["index.json"] != hashes["index.json"]


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """The packages copied under tmp_path, read by arrag.codehash instead of the repository's."""
    for package in codehash.PACKAGES:
        shutil.copytree(codehash.ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codehash, "ROOT", tmp_path)
    for cached in (codehash.module_imports, codehash.module_closure, codehash.cli_functions):
        cached.cache_clear()
    yield tmp_path
    for cached in (codehash.module_imports, codehash.module_closure, codehash.cli_functions):
        cached.cache_clear()


def touch(path, text="\n# changed\n"):
    path.write_text(path.read_text() + text)


def test_a_source_change_changes_the_hash_of_the_steps_that_run_it_only(repo_copy):
    steps = ["train-vq", "train-lm", "generate", "tables", "eval:fid", "eval:fwd"]
    before = {step: codehash.code_hash(step) for step in steps}
    assert "evaluators/fwd.py" in codehash.step_files("eval:fwd")
    assert not any(f.startswith("arrag/") for f in codehash.step_files("eval:fid"))
    touch(repo_copy / "evaluators" / "fwd.py")
    codehash.module_closure.cache_clear()
    after = {step: codehash.code_hash(step) for step in steps}
    assert [s for s in steps if after[s] != before[s]] == ["eval:fwd"]
    touch(repo_copy / "arrag" / "training" / "vq.py")
    changed = {step: codehash.code_hash(step) for step in steps}
    importers = [s for s in steps if "arrag/training/vq.py" in codehash.step_files(s)]
    assert [s for s in steps if changed[s] != after[s]] == importers
    assert "train-vq" in importers and not {"tables", "eval:fid", "eval:fwd"} & set(importers)


def test_a_cli_change_reaches_only_the_command_it_is_in(repo_copy):
    """An edit of one command's function changes that command's hash only, also among the commands of its own stage
    module (train-lm beside train-vq); an edit of the shared options reaches every command."""
    steps = ("train-vq", "train-lm", "generate")
    before = {step: codehash.code_hash(step) for step in steps}
    generate = repo_copy / "arrag" / "cli" / "generate.py"
    generate.write_text(generate.read_text().replace("def cmd_generate(args: argparse.Namespace) -> int:\n",
                                                     "def cmd_generate(args: argparse.Namespace) -> int:\n    pass\n"))
    models = repo_copy / "arrag" / "cli" / "models.py"
    models.write_text(models.read_text().replace("def cmd_train_lm(args: argparse.Namespace) -> None:\n",
                                                 "def cmd_train_lm(args: argparse.Namespace) -> None:\n    pass\n"))
    codehash.cli_functions.cache_clear()
    after = {step: codehash.code_hash(step) for step in steps}
    assert [step for step in steps if after[step] != before[step]] == ["train-lm", "generate"]
    touch(repo_copy / "arrag" / "cli" / "options.py")
    codehash.module_closure.cache_clear()
    codehash.module_imports.cache_clear()
    assert all(codehash.code_hash(step) != after[step] for step in steps)


def test_the_code_hash_is_the_same_in_every_process():
    """Snakemake compares a rule's code param with the one recorded by an earlier run in another process: a hash
    that depended on set order (PYTHONHASHSEED) would rerun every job every time."""
    code = "from arrag.codehash import code_hash; print(code_hash('generate'), code_hash('eval:fid'))"
    outputs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=True).stdout for seed in ("1", "2", "3")}
    assert len(outputs) == 1
