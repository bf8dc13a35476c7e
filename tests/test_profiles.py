"""The execution profiles: SLURM (dry run without SLURM or conda installed) and one machine (GPU as a resource)."""

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "profiles" / "slurm" / "config.yaml"
DEFAULT = REPO / "profiles" / "default" / "config.yaml"
# Rules that run on a GPU at paper scale; every other rule must not request one.
GPU_RULES = {"encode_patches", "tokenize_split", "retrieval_analysis", "precompute_retrievals", "finetune_faid",
             "build_clip_index", "finetune_racm3", "generate", "image_metric", "geneval_score", "dpg_score",
             "encode_patches_showo", "tokenize_split_showo", "finetune_showo_faid"}
FINETUNE_RULES = {"finetune_faid", "finetune_racm3", "finetune_showo_faid"}
# conda is not installable on these machines; the SLURM profile deploys software with conda, which Snakemake
# checks even in a dry run. This stand-in answers the three questions it asks (version, info, channel priority).
FAKE_CONDA = """#!/bin/sh
case "$*" in
  --version) echo "conda 24.9.2" ;;
  "info --json") echo '{"conda_prefix": "/nonexistent", "platform": "linux-64", "envs_dirs": [], "pkgs_dirs": []}' ;;
  *) echo '{"get": {"channel_priority": "strict"}}' ;;
esac
"""


def dry_run(*args, path_prefix: str = "") -> tuple[str, float]:
    """`snakemake -n` (every target) in the repository; returns its output and the CPU seconds it took."""
    env = {**os.environ, "PATH": os.pathsep.join(filter(None, [path_prefix, str(Path(sys.executable).parent),
                                                                os.environ["PATH"]]))}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                             "-n", *args], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def job_resources(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job block of a dry run."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", output):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.MULTILINE)
        found = re.search(r"^\s+resources: (.*)$", block, re.MULTILINE)
        if rule:
            pairs = (item.split("=", 1) for item in found.group(1).split(", ")) if found else []
            jobs.append((rule.group(1), dict(pairs)))
    return jobs


@pytest.fixture(scope="module")
def paper_dry_run() -> tuple[str, float]:
    """The one-machine dry run of the paper config: output and CPU seconds."""
    return dry_run("--configfile", "config/config.yaml")


@pytest.fixture(scope="module")
def fake_conda(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("conda")
    (folder / "conda").write_text(FAKE_CONDA)
    (folder / "conda").chmod(0o755)
    return folder


def test_slurm_profile_dry_run_of_the_paper_config(fake_conda, paper_dry_run):
    output, cpu_seconds = dry_run("--profile", "profiles/slurm", "--configfile", "config/config.yaml",
                                  path_prefix=str(fake_conda))
    assert "Using profiles profiles/slurm and workflow specific profile profiles/default" in output
    jobs = job_resources(output)
    rules = {rule for rule, _ in jobs}
    assert GPU_RULES <= rules
    for rule, res in jobs:
        if rule == "all":
            continue
        assert (res.get("gpu") == "1") == (rule in GPU_RULES), (rule, res)
        assert {"runtime", "mem_mb", "cpus_per_task"} <= set(res), (rule, res)
    generate = next(res for rule, res in jobs if rule == "generate")
    assert int(generate["runtime"]) >= 120 and int(generate["cpus_per_task"]) >= 4
    # CPU time, not wall time, so a busy machine does not count; relative to the same DAG without the profile,
    # so a slow one does not either. Measured 8.8 s against 6.4 s (1.4x): the plugin and the conda checks.
    plain_seconds = paper_dry_run[1]
    assert cpu_seconds < 2 * plain_seconds, f"dry run took {cpu_seconds:.1f} s of CPU, {plain_seconds:.1f} s without"


def test_slurm_profile_settings():
    profile = yaml.safe_load(SLURM.read_text())
    assert profile["executor"] == "slurm" and profile["retries"] >= 1
    assert "slurm_extra" not in SLURM.read_text()  # GPUs through the plugin's gpu resource, not raw sbatch flags
    assert "generate" in profile["slurm-array-jobs"].split(",")
    assert profile["set-resource-scopes"] == {"gpu": "local"}
    # the fine-tuning rules take their GPU count from the config (finetune_gpus), so the profile leaves it to them
    assert {rule for rule, res in profile["set-resources"].items() if res.get("gpu")} == GPU_RULES - FINETUNE_RULES
    for rule, res in {**profile["set-resources"], "default": profile["default-resources"]}.items():
        runtime = str(res["runtime"])
        assert eval(runtime, {"attempt": 2}) > eval(runtime, {"attempt": 1}), rule  # noqa: S307 (our profile)


def test_the_workflow_profile_does_not_cap_cluster_gpu_jobs():
    """profiles/default is loaded with --profile profiles/slurm and wins key by key; its one-machine GPU limit
    must then be local to each job, not a cap on queued jobs."""
    from snakemake.cli import get_argument_parser

    args = get_argument_parser(profiles=[SLURM.parent, DEFAULT.parent]).parse_args([])
    assert args.executor == "slurm" and args.resources["gpu"].value == 1
    assert args.set_resource_scopes == {"gpu": "local"}


def test_one_machine_gpu_limit_and_gpu_requests_only_on_gpu_rules(paper_dry_run):
    assert yaml.safe_load(DEFAULT.read_text())["resources"] == {"gpu": 1}
    output, _ = paper_dry_run
    assert "workflow specific profile profiles/default" in output
    requesting = {rule for rule, res in job_resources(output) if res.get("gpu", "0") != "0"}
    assert requesting and requesting <= GPU_RULES
    shapes, _ = dry_run("--configfile", "config/ci.yaml")
    assert all(res.get("gpu", "0") == "0" for _, res in job_resources(shapes))  # the Shapes world runs on CPUs


def test_several_finetuning_gpus_request_them_and_launch_torchrun():
    output, _ = dry_run("-p", "--configfile", "config/config.yaml", "--config", "finetune_gpus=4",
                        "--resources", "gpu=8")
    jobs = dict(job_resources(output))
    assert jobs["finetune_faid"]["gpu"] == "4" and jobs["finetune_racm3"]["gpu"] == "4"
    assert jobs["generate"]["gpu"] == "1"
    assert "torchrun --standalone --nproc_per_node 4 -m arrag.cli finetune-faid" in output
    assert "torchrun --standalone --nproc_per_node 4 -m arrag.cli finetune-racm3" in output
    assert jobs["finetune_showo_faid"]["gpu"] == "4"
    assert "torchrun --standalone --nproc_per_node 4 -m arrag.cli finetune-showo-faid" in output
