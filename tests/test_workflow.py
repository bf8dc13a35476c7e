"""The Snakemake DAG: dry runs of every config, lint, and the CI config end to end."""

import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from arrag.config import config_hash, load

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ["demo", "ci", "config"]


def snakemake(*args, cwd=REPO, check=True, repo=REPO):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(repo / "Snakefile"), *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def job_counts(output: str) -> dict[str, int]:
    table = output[output.index("Job stats:"):]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


def dry_run(name: str) -> tuple[subprocess.CompletedProcess, float]:
    """`snakemake -n --forceall` of config/<name>.yaml and the CPU seconds it took (CPU, not wall
    time: a busy machine does not count)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = snakemake("-n", "--forceall", "--cores", "2", "--configfile", f"config/{name}.yaml")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return result, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


@pytest.fixture(scope="module")
def ci_dry_run_seconds() -> float:
    return dry_run("ci")[1]


@pytest.mark.parametrize("name", CONFIGS)
def test_dry_run_of_the_whole_pipeline(name, ci_dry_run_seconds):
    config = load(REPO / "config" / f"{name}.yaml")
    result, cpu_seconds = dry_run(name)
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
        assert counts["finetune_split"] == 1  # the fine-tuning pairs, built from the fetched datasets
        assert "shapes_split" not in counts
    # Building the DAG costs little per job. The paper config's 2,313 jobs took 2.6x the CPU of the CI config's 101
    # on an Intel Xeon (3.9 s against 1.5 s) and 4.2x on an AMD EPYC (14.8 s against 3.5 s); a profile there puts
    # it all in Snakemake's own DAG update and wildcard matching, none in our input functions. 8x is above that
    # spread; an input function of ours costing 10 ms per job (a code hash or a config read not cached) adds 23 s.
    assert cpu_seconds < 8 * ci_dry_run_seconds, f"{cpu_seconds:.1f} s of CPU ({ci_dry_run_seconds:.1f} s for ci)"


@pytest.mark.parametrize("name", CONFIGS)
def test_lint_is_clean(name):
    result = snakemake("--lint", "--configfile", f"config/{name}.yaml")
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_snakefmt_is_clean():
    """The Snakefile and rule files are formatted as `snakefmt` writes them (`make lint` checks the same)."""
    snakefmt = Path(sys.executable).parent / "snakefmt"
    result = subprocess.run([str(snakefmt), "--check", "Snakefile", "workflow/rules"], cwd=REPO, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


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


def copy_workflow(dest: Path) -> Path:
    """The workflow with its packages, configs, profiles and the paper's numbers, copied to `dest`."""
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("arrag", "evaluators", "workflow", "config", "profiles", "results/reported"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    shutil.copy(REPO / "Snakefile", dest / "Snakefile")
    return dest


def outputs(run: Path) -> dict[str, int]:
    """Every output file of a run -> its modification time (ns)."""
    return {p.relative_to(run).as_posix(): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_ci_config_end_to_end_and_reruns_of_what_changed(tmp_path):
    """Every stage of the CI config runs; a second run has nothing to do; after a change of a source
    file or of a sampling setting, exactly the outputs that depend on it are made again (in a copy of the
    repository, whose files the test edits)."""
    repo = copy_workflow(tmp_path / "repo")
    config = repo / "config" / "ci.yaml"
    args = ["--cores", "2", "--configfile", str(config), "--directory", str(tmp_path)]
    snakemake(*args, repo=repo)  # its time is the README's CI budget, measured there, not asserted here
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
    vq = json.loads((run / "models" / "vq" / "metrics.json").read_text())
    assert vq["precision"] in ("fp32", "bf16") and fid["precision"] in ("fp32", "bf16")
    assert fid["config_hash"] == config_hash(load(config))  # provenance, though no rule's param
    table3 = (run / "tables" / "table3_mjhq.md").read_text()
    assert "Show-o" in table3
    again = snakemake(*args, repo=repo)
    assert "Nothing to be done" in again.stdout + again.stderr

    # a source file of one metric: its records (and the tables) are made again, nothing else
    before = outputs(run)
    fwd = repo / "evaluators" / "fwd.py"
    fwd.write_text(fwd.read_text() + "\n# changed\n")
    snakemake(*args, repo=repo)
    after = outputs(run)
    changed = {p for p in before if after.get(p) != before[p]}
    assert changed, "nothing reran after a change of evaluators/fwd.py"
    assert all(p.endswith("/fwd.json") or p.startswith("tables/") for p in changed), sorted(changed)
    assert {p for p in before if p.endswith("/fwd.json")} <= changed

    # Janus's sampling setting: a dry run plans every Janus generation and the records downstream, nothing else
    janus_config = tmp_path / "janus.yaml"
    janus_config.write_text(config.read_text().replace("sampling: {cfg_weight: 3.0,", "sampling: {cfg_weight: 2.0,"))
    janus = job_counts(snakemake("-n", "--cores", "2", "--configfile", str(janus_config), "--directory", str(tmp_path),
                                 repo=repo).stdout)
    ci = load(config)
    shards, n_janus = ci["sampling"]["shards"], len(ci["methods"])
    n_cells = (len(ci["daid"]["grid"]["lam"]) * len(ci["daid"]["grid"]["tau"])
               + len(ci["faid"]["grid"]["hops"]) * len(ci["faid"]["grid"]["m"]))  # ablation cells (DAiD, FAiD)
    expected = {"generate": n_janus * (shards["geneval"] + shards["dpg"] + shards["mjhq"])
                + n_cells * shards["mjhq_ablation"],
                "gather_generation": 3 * n_janus + n_cells,
                "image_metric": 3 * n_janus + n_cells,  # FID / CMMD / FWD of each main row, FID of each cell
                "geneval_score": n_janus, "dpg_score": n_janus, "select": 2, "tables": 1, "all": 1}
    assert janus == {**expected, "total": sum(expected.values())}

    # Show-o's sampling setting, run: its images and the records downstream are new, nothing else is touched
    config.write_text(config.read_text().replace("sampling: {guidance_scale: 2.0,", "sampling: {guidance_scale: 1.5,"))
    images = {p: (run / p).read_bytes() for p in after if p.startswith("generated/") and "/showo" in p
              and p.endswith(".png")}
    assert images
    snakemake(*args, repo=repo)
    rerun = outputs(run)
    changed = {p for p in after if rerun.get(p) != after[p]}
    showo = {p for p in after if p.startswith(("generated/", "metrics/")) and "/showo" in p}
    assert showo <= changed, sorted(showo - changed)
    assert changed <= showo | {p for p in after if p.startswith("tables/")}, sorted(changed - showo)
    assert any((run / p).read_bytes() != images[p] for p in images)
