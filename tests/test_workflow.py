"""The Snakemake DAG: dry runs of every config, lint, and the CI config end to end."""

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arrag.config import load

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ["demo", "ci", "config"]


def snakemake(*args, cwd=REPO, check=True):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def job_counts(output: str) -> dict[str, int]:
    table = output[output.index("Job stats:"):]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


@pytest.mark.parametrize("name", CONFIGS)
def test_dry_run_of_the_whole_pipeline(name):
    config = load(REPO / "config" / f"{name}.yaml")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = snakemake("everything", "-n", "--forceall", "--cores", "2", "--configfile", f"config/{name}.yaml")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime  # robust to a busy machine
    counts = job_counts(result.stdout + result.stderr)
    shards, index_shards = config["sampling"]["shards"], config["index"]["shards"]
    n_daid = len(config["daid"]["grid"]["lam"]) * len(config["daid"]["grid"]["tau"])
    n_faid = len(config["faid"]["grid"]["hops"]) * len(config["faid"]["grid"]["m"])
    n_showo = len(config["showo"]["methods"])  # Show-o rows: the MJHQ-style benchmark only
    folders = 3 * len(config["methods"]) + n_daid + n_faid + n_showo  # (benchmark, method) rows + ablation cells
    main_shards = shards["geneval"] + shards["dpg"] + shards["mjhq"]
    assert counts["generate"] == (len(config["methods"]) * main_shards + (n_daid + n_faid) * shards["mjhq_ablation"]
                                  + n_showo * shards["mjhq"])
    assert counts["gather_generation"] == folders
    assert counts.get("showo_index", 0) == int(n_showo > 0)
    assert counts.get("finetune_showo_faid", 0) == int("showo_faid" in config["showo"]["methods"])
    if config["scale"] == "shapes":  # Show-o trained in the DAG; its O index redefined from the main shards
        assert counts.get("train_shapes_showo", 0) == int(n_showo > 0) and "encode_patches_showo" not in counts
    else:  # the hub Show-o, its MAGVIT-v2 tokens of the database (one job per shard) and of the fine-tuning images
        assert counts.get("fetch_showo_model", 0) == 3 * (n_showo > 0) and "train_shapes_showo" not in counts
        assert counts.get("encode_patches_showo", 0) == index_shards * (n_showo > 0)
        assert counts.get("tokenize_split_showo", 0) == int("showo_faid" in config["showo"]["methods"])
    assert counts["encode_patches"] == counts["add_shard"] == counts["precompute_retrievals"] == index_shards
    assert counts["finetune_faid"] == n_faid
    assert counts["image_metric"] == 3 * len(config["methods"]) + n_daid + n_faid + 3 * n_showo
    assert counts["geneval_score"] == counts["dpg_score"] == len(config["methods"])
    assert counts["tables"] == 1
    if config["scale"] == "shapes":
        assert counts["shapes_split"] == 3 and counts["train_shapes_lm"] == 1
    else:
        fetches = [f"fetch_{name}" for name in config["resources"]["benchmarks"]] + ["fetch_backbone"]
        assert all(counts[rule] == 1 for rule in fetches) and counts["fetch_datasets"] == 2
        assert "shapes_split" not in counts
    assert cpu_seconds < 10, f"dry run took {cpu_seconds:.1f} s of CPU"


@pytest.mark.parametrize("name", CONFIGS)
def test_lint_is_clean(name):
    result = snakemake("--lint", "--configfile", f"config/{name}.yaml")
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_index_files_are_declared_by_type():
    """The tokens index is not named like a FAISS file; an ivfpq index merged on disk declares its lists."""
    paper = snakemake("results/paper/index/index.faiss.ivfdata", "-n", "--forceall",
                      "--configfile", "config/config.yaml")
    assert "merge_index" in paper.stdout
    demo = snakemake("results/demo/index/index.tokens.json", "-n", "--forceall", "--configfile", "config/demo.yaml")
    assert "merge_index" in demo.stdout and "index.faiss" not in demo.stdout


def test_invalid_config_fails_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: x\nscale: shapes\nshapes: {splits: {databse: 3}}\n")
    result = snakemake("-n", "--configfile", str(bad), check=False)
    assert result.returncode != 0
    assert "unknown key(s) ['databse'] in 'shapes.splits'" in result.stdout + result.stderr


@pytest.mark.slow
def test_ci_config_end_to_end(tmp_path):
    """Every implemented stage of the CI config runs; a second run has nothing to do."""
    args = ["--cores", "2", "--configfile", str(REPO / "config" / "ci.yaml"), "--directory", str(tmp_path)]
    started = time.perf_counter()
    result = snakemake(*args)
    elapsed = time.perf_counter() - started
    log = result.stdout + result.stderr
    run = tmp_path / "results" / "ci"
    for split in ("database", "train", "heldout"):
        assert (run / "shapes" / split / "annotations.jsonl").is_file()
    for path in ("geneval/evaluation_metadata.jsonl", "dpg_bench/dpg_bench.csv", "mjhq/meta_data.json",
                 "vocabulary.json"):
        assert (run / "benchmarks" / path).is_file()
    assert (tmp_path / "logs" / "ci" / "shapes_benchmarks.log").is_file()
    for method, variant in (("showo", "default"), ("showo_daid", "lam0.1_tau0.5"), ("showo_faid", "default")):
        fid = json.loads((run / "metrics" / "mjhq" / method / variant / "fid.json").read_text())
        assert fid["n_images"]["gen"] == 16
    table3 = (run / "tables" / "table3_mjhq.md").read_text()
    assert "Show-o" in table3
    if "not implemented yet" in log:
        assert "stage(s) not implemented yet, left out of `all`" in log
    assert elapsed < 8 * 60
    again = snakemake(*args)
    assert "Nothing to be done" in again.stdout + again.stderr
