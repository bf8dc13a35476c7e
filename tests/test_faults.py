"""Fault injection on the CI config's commands, run as the workflow runs them (subprocesses on a tiny Shapes world).

Kills: a generation, a training and an index-building job get SIGKILL at a random point of their work, then the
same command runs again; its outputs must equal those of an uninterrupted run, with no temporary file left. The
delay is `random.Random(f"{SEED}:{case}").uniform(*KILL_WINDOW)` times the uninterrupted run's *work* (timed in
the fixture from the job's first progress line to its last output line), counted from the same progress line, so
the kill lands while the job computes rather than while it imports.

Bad inputs: a truncated PNG among generated images, a truncated safetensors checkpoint, a truncated index file, an
exclusion list that is not JSON, a config with a misspelt key and one with a value of the wrong type, an index
built with another codebook, and benchmark metadata whose ids try to leave the output folder. Each must exit
non-zero with an error whose last line names the file (or the config key) and says what to do, and leave no output
behind.

Sizes: the CI config's (config/ci.yaml) or smaller, but for the training run's steps (LM_STEPS). Jobs that are not
timed run two at a time, as the workflow runs them on two cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from arrag.benchmarks import prompt_items
from arrag.config import ConfigError, load

REPO = Path(__file__).resolve().parent.parent
CI = load(REPO / "config" / "ci.yaml")
SEED = 20  # the kill delays: random.Random(f"{SEED}:{case}").uniform(*KILL_WINDOW) x the work's duration
KILL_WINDOW = (0.2, 0.8)
# The training loops checkpoint every 100 steps (not a CLI option): 200 steps put a checkpoint mid-run, so a kill
# after it resumes from it (CI's 30 LM steps would only checkpoint at the end). 200 steps of the CI-sized LM take
# a few seconds.
LM_STEPS = 200
VQ_STEPS = 10  # the VQ only feeds the other jobs here (CI: 40)
MICRO_BATCH = 2  # CI: 8; smaller micro-batches give the generation job several to be killed between
# One thread per job (as the workflow's Shapes jobs), output unbuffered (the kills follow the jobs' progress lines).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
TEMPORARY = re.compile(r"^\..*\.tmp$")  # evaluators.io.write_bytes_atomic and arrag's other atomic writers


def arrag_command(*args) -> list[str]:
    return [sys.executable, "-m", "arrag.cli", *map(str, args)]


def run(command: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command[2:])} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


class Job:
    """A command in the background whose output (stdout and stderr) a thread reads, noting when `start` (the job's
    first progress line: its work begins) and `end` (its last line: its outputs are written) appear; `started` is
    also set at the end of the output."""

    def __init__(self, command: list[str], cwd: Path, start: str, end: str):
        self.process = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.markers, self.output = (start.encode(), end.encode()), bytearray()
        self.started_at = self.ended_at = None
        self.started = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.process.stdout.read1(1 << 16), b""):
            self.output += chunk
            if self.started_at is None and self.markers[0] in self.output:
                self.started_at = time.perf_counter()
                self.started.set()
            if self.ended_at is None and self.markers[1] in self.output:
                self.ended_at = time.perf_counter()
        self.started.set()

    def wait(self) -> int:
        code = self.process.wait()
        self.reader.join()
        return code

    def text(self) -> str:
        return self.output.decode(errors="replace")


def run_measured(command: list[str], cwd: Path, start: str, end: str) -> float:
    """Run to the end; the seconds from the `start` line to the `end` line of its output (its work)."""
    job = Job(command, cwd, start, end)
    code = job.wait()
    assert code == 0, f"{' '.join(command[2:])} failed ({code}):\n{job.text()[-3000:]}"
    assert job.started_at and job.ended_at, f"no {start!r} or {end!r} in the output of {' '.join(command[2:])}"
    return job.ended_at - job.started_at


def kill_mid_work(command: list[str], cwd: Path, start: str, end: str, work_seconds: float, case: str) -> float:
    """Start `command` in the empty folder `cwd` and SIGKILL it a random fraction of `work_seconds` after its `start`
    line, before its `end` line (its outputs written); returns the fraction. When this machine ran the job faster
    than the reference run (the `end` line came first) the outputs are removed and the job runs again, killed at half
    the delay (twice at most)."""
    fraction = random.Random(f"{SEED}:{case}").uniform(*KILL_WINDOW)
    for _ in range(3):
        for path in cwd.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        job = Job(command, cwd, start, end)
        job.started.wait(timeout=600)
        assert job.started_at is not None, f"{case}: the job ended before its work began:\n{job.text()[-2000:]}"
        time.sleep(fraction * work_seconds)
        job.process.send_signal(signal.SIGKILL)
        code = job.wait()
        if job.ended_at is None:
            assert code == -signal.SIGKILL, f"{case}: exit {code}:\n{job.text()[-2000:]}"
            return fraction
        fraction /= 2
    raise AssertionError(f"{case}: three kills came after the job's work ({work_seconds:.1f} s in the reference run)")


def in_parallel(*calls: Callable):
    """The results of `calls` (each waits on subprocesses), two at a time."""
    with ThreadPoolExecutor(2) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


def contents(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path (but temporary files and the names in `skip`)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip and not TEMPORARY.match(p.name)}


def temporary_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if TEMPORARY.match(p.name)
                  or (p.is_dir() and p.name.startswith(".")))


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_refused(result: subprocess.CompletedProcess, names: list[str], fix: str, absent: list[Path]) -> None:
    """Non-zero exit; the error's last line names every one of `names` and matches the `fix` pattern; none of
    the `absent` outputs exists."""
    line = last_line(result)
    assert result.returncode != 0, f"exit 0:\n{result.stdout[-1500:]}\n{result.stderr[-1500:]}"
    for name in names:
        assert name in line, f"{name!r} not named in the error's last line: {line!r}\n{result.stderr[-3000:]}"
    assert re.search(fix, line), f"no fix ({fix!r}) in the error's last line: {line!r}"
    for path in absent:
        assert not path.exists(), f"partial output left behind: {path}"


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])


# ------------------------------------------------------------------------------------------ the Shapes world
class World:
    """Paths of the fixture's run folder and the commands the tests run again."""

    def __init__(self, root: Path):
        self.root = root
        self.shapes = root / "shapes"
        self.benchmarks = root / "benchmarks"
        self.vq = root / "models" / "vq"
        self.backbone = root / "models" / "backbone"
        self.exclusions = root / "index" / "exclusions.json"
        self.shards = [root / "index" / "shards" / f"{i}.npz" for i in range(CI["index"]["shards"])]
        self.index = root / "index" / "index.tokens"
        self.generated = root / "generated" / "geneval" / "vanilla" / "default"
        self.work: dict[str, float] = {}

    def lm_command(self, out: Path, checkpoint: Path) -> list[str]:
        lm = CI["shapes_models"]["lm"]
        return arrag_command(
            "train-lm", "--images", self.shapes / "train", "--vq", self.vq, "--out", out, "--checkpoint", checkpoint,
            "--steps", LM_STEPS, "--batch-size", lm["batch_size"], "--lr", lm["lr"], "--hidden-size", lm["hidden_size"],
            "--num-layers", lm["num_layers"], "--num-heads", lm["num_heads"],
            "--intermediate-size", lm["intermediate_size"], "--caption-dropout", lm["caption_dropout"],
            "--seed", CI["seed"], "--precision", CI["precision"])

    def generate_command(self, images: Path, record: Path, *extra, benchmark: str = "geneval",
                         prompts: Path | None = None, backbone: Path | None = None, method: str = "vanilla",
                         variant: str = "default") -> list[str]:
        sampling = CI["sampling"]
        prompts = prompts or (self.benchmarks / "geneval" / "evaluation_metadata.jsonl")
        return arrag_command(
            "generate", "--benchmark", benchmark, "--prompts", prompts, "--method", method, "--variant", variant,
            "--backbone", backbone or self.backbone, "--shard", 0, "--revision=", "--device", CI["device"],
            "--shards", 1, "--seed", CI["seed"], "--cfg-weight", sampling["cfg_weight"],
            "--temperature", sampling["temperature"], "--top-k", 0, "--top-p", 1.0, "--micro-batch", MICRO_BATCH,
            "--samples-per-prompt", CI["benchmarks"]["geneval"]["samples_per_prompt"],
            "--ablation-subset", CI["benchmarks"]["mjhq"]["ablation_subset"], *extra,
            "--daid-k", CI["daid"]["k"], "--images", images, "--record", record, "--precision", CI["precision"])

    def daid_command(self, images: Path, record: Path, index: Path, backbone: Path | None = None) -> list[str]:
        return self.generate_command(images, record, "--index", index, method="daid", variant="lam0.3_tau1.0",
                                     backbone=backbone)

    def encode_command(self, shard: int, out: Path, exclusions: Path | None = None) -> list[str]:
        index = CI["index"]
        return arrag_command(
            "encode-patches", "--images", self.shapes / "database", "--vq", self.vq,
            "--exclusions", exclusions or self.exclusions, "--shard", shard, "--shards", index["shards"],
            "--neighbourhood", index["neighbourhood"], "--hops", index["hops"], "--key-space", index["key_space"],
            "--edge-policy", index["edge_policy"], "--batch-size", index["batch_size"], "--device", CI["device"],
            "--out", out)

    def build_index_command(self, shards: list[Path], out: Path) -> list[str]:
        return arrag_command("build-index", "--type", CI["index"]["type"], "--seed", CI["seed"], "--out", out, *shards)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """The CI config's data, models, one generation and the index, made by the workflow's commands (uninterrupted
    runs: the references of the kill tests, whose work they time)."""
    w = World(tmp_path_factory.mktemp("faults"))
    shapes, bench, vq = CI["shapes"], CI["benchmarks"], CI["shapes_models"]["vq"]
    common = ["--seed", CI["seed"], "--image-size", shapes["image_size"], "--supersample", shapes["supersample"]]
    for split, count in shapes["splits"].items():
        run(arrag_command("shapes-world", "--split", split, "--count", count, "--out", w.shapes / split, *common),
            w.root)
    run(arrag_command("shapes-benchmarks", "--heldout", w.shapes / "heldout", "--out", w.benchmarks, *common,
                      "--geneval-per-tag", bench["geneval"]["per_tag"], "--dpg-prompts", bench["dpg"]["count"],
                      "--mjhq-images", bench["mjhq"]["count"]), w.root)
    in_parallel(
        lambda: run(arrag_command(
            "train-vq", "--images", w.shapes / "database", "--heldout", w.shapes / "heldout", "--out", w.vq,
            "--checkpoint", w.root / "checkpoints" / "vq.pt", "--image-size", shapes["image_size"],
            "--steps", VQ_STEPS, "--batch-size", vq["batch_size"], "--lr", vq["lr"],
            "--codebook-size", vq["codebook_size"], "--seed", CI["seed"], "--precision", CI["precision"]), w.root),
        lambda: run(arrag_command("exclusion-list", "--out", w.exclusions, w.shapes / "heldout", w.shapes / "train",
                                  w.benchmarks), w.root))

    # the kill tests' references, timed one at a time (a job beside another would be timed slower than it runs alone)
    w.work["train"] = run_measured(w.lm_command(w.backbone, w.root / "checkpoints" / "lm.pt"), w.root, "train LM",
                                   "final loss")
    w.work["generate"] = run_measured(w.generate_command(w.generated / "images", w.generated / "shards" / "0.json"),
                                      w.root, "generate geneval", "already there")
    for shard, path in enumerate(w.shards):
        w.work[f"encode{shard}"] = run_measured(w.encode_command(shard, path), w.root, f"encode shard {shard}",
                                                '"kept":')
    run(w.build_index_command(w.shards, w.index), w.root)
    return w


# ------------------------------------------------------------------------------------------ SIGKILL, then rerun
@pytest.fixture(scope="module")
def generation_rerun(world, tmp_path_factory) -> dict:
    """A generation job killed mid-work, then run again. Between the two, the temporary file that a kill inside
    `write_bytes_atomic` leaves (`.<name>.<random>.tmp`, the next image's) is put beside the images: a kill lands
    there too rarely for a test to meet it by chance."""
    folder = tmp_path_factory.mktemp("generation")
    images, record = folder / "images", folder / "shards" / "0.json"
    command = world.generate_command(images, record)
    kill_mid_work(command, folder, "generate geneval", "already there", world.work["generate"], "generate")
    reference = json.loads((world.generated / "shards" / "0.json").read_text())
    timings = folder / "images.timings"
    done = len(list(timings.glob("*.json"))) if timings.is_dir() else 0  # complete micro-batches (timed last)
    killed = {"record": record.exists(), "images": len(list(images.rglob("*.png")))}
    cut = images / reference["files"][min(done * MICRO_BATCH, len(reference["files"]) - 1)]
    cut.parent.mkdir(parents=True, exist_ok=True)
    (cut.parent / f".{cut.name}.x7kq2m9a.tmp").write_bytes(b"\x89PNG\r\n\x1a\n")
    run(command, folder)
    return {"folder": folder, "images": images, "reference": reference, "done": done, "killed": killed,
            "rerun": json.loads(record.read_text())}


def test_generation_killed_then_rerun_gives_byte_identical_images(world, generation_rerun):
    """Images are written atomically (a temporary file renamed) and a micro-batch's timing record after its images;
    the rerun generates what is missing with the same seeds: every image and metadata file is byte-identical to the
    uninterrupted run's. Not compared: the wall times in the timing records and the record."""
    g = generation_rerun
    total = len(g["reference"]["files"])
    assert not g["killed"]["record"] and g["killed"]["images"] < total, g["killed"]  # killed mid-work
    assert g["rerun"]["files"] == g["reference"]["files"]
    assert g["rerun"]["images_skipped"] + g["rerun"]["images_generated"] == total
    assert contents(g["images"]) == contents(world.generated / "images")


def test_generation_rerun_after_a_kill_keeps_the_complete_micro_batches(generation_rerun):
    g = generation_rerun
    assert g["rerun"]["fingerprint"] == g["reference"]["fingerprint"]
    assert g["rerun"]["images_skipped"] == MICRO_BATCH * g["done"]


def test_generation_rerun_after_a_kill_removes_temporary_files(generation_rerun):
    assert temporary_files(generation_rerun["folder"]) == []


def test_training_killed_then_rerun_gives_byte_identical_weights(world, tmp_path):
    """The LM's checkpoint holds everything the next step depends on (tests/test_train_lm.py): killed after its
    checkpoint of step 100, the rerun resumes from it; killed before, it starts over. Either way the weights,
    tokenizer, loss log and plots are byte-identical; metrics.json is equal but for the wall time (train_seconds)."""
    out, checkpoint = tmp_path / "backbone", tmp_path / "checkpoints" / "lm.pt"
    command = world.lm_command(out, checkpoint)
    kill_mid_work(command, tmp_path, "train LM", "final loss", world.work["train"], "train")
    resumable = checkpoint.is_file()

    output = run(command, tmp_path).stderr
    progress = re.search(rf"(\d+)/{LM_STEPS} \[", output)  # tqdm's first line: the step the rerun starts at
    assert progress, output[-2000:]
    first = int(progress.group(1))
    assert first in ((100, LM_STEPS) if resumable else (0,)), output[-2000:]
    assert contents(out, skip=("metrics.json",)) == contents(world.backbone, skip=("metrics.json",))
    metrics, reference = (json.loads((folder / "metrics.json").read_text()) for folder in (out, world.backbone))
    assert {k: v for k, v in metrics.items() if k != "train_seconds"} == \
        {k: v for k, v in reference.items() if k != "train_seconds"}
    assert temporary_files(tmp_path) == []


def test_index_build_killed_then_rerun_gives_byte_identical_index(world, tmp_path):
    """A shard is written once, atomically, at the end of `encode-patches` (the index build's long job): a killed
    job leaves nothing, the rerun writes the same bytes, and the index built with it equals the uninterrupted run's
    byte for byte (index, fingerprint and values)."""
    shard = tmp_path / "shards" / "1.npz"
    command = world.encode_command(1, shard)
    kill_mid_work(command, tmp_path, "encode shard 1", '"kept":', world.work["encode1"], "index")
    assert not shard.exists()

    run(command, tmp_path)
    assert shard.read_bytes() == world.shards[1].read_bytes()
    index = tmp_path / "index" / "index.tokens"
    run(world.build_index_command([world.shards[0], shard], index), tmp_path)
    for suffix in ("", ".json", ".values.npz"):
        assert Path(f"{index}{suffix}").read_bytes() == Path(f"{world.index}{suffix}").read_bytes(), suffix
    assert temporary_files(tmp_path) == []


# ------------------------------------------------------------------------------------------ bad inputs
@dataclass
class Refusal:
    """A command given a bad input: the names its error's last line must hold, the fix it must state (a pattern)
    and the outputs that must not exist afterwards."""

    command: list[str]
    names: list[str]
    fix: str
    absent: list[Path]
    nothing_named: str | None = None  # no file whose name holds this anywhere in the case's folder


REFUSALS: dict[str, Callable[[World, Path], Refusal]] = {}
IMAGE_FIX = r"delete it and rerun the job that wrote it"


def refusal(make: Callable[[World, Path], Refusal]) -> Callable[[World, Path], Refusal]:
    REFUSALS[make.__name__] = make
    return make


def broken_images(w: World, folder: Path) -> tuple[Path, Path]:
    """A copy of the generated GenEval images with one PNG cut to half its bytes."""
    images = folder / "images"
    shutil.copytree(w.generated / "images", images)
    broken = images / "00002" / "samples" / "0001.png"
    truncate(broken)
    return images, broken


@refusal
def truncated_png_gather(w: World, folder: Path) -> Refusal:
    images, broken = broken_images(w, folder)
    record = folder / "record.json"
    command = arrag_command("generate", "--gather", "--record", record, "--images", images,
                            w.generated / "shards" / "0.json")
    return Refusal(command, [str(broken)], IMAGE_FIX, [record, folder / "sample_grid.png"])


@refusal
def truncated_png_metric(w: World, folder: Path) -> Refusal:
    images, broken = broken_images(w, folder)
    metric = folder / "fwd.json"
    command = [sys.executable, "-m", "evaluators", "fwd", str(w.benchmarks / "mjhq" / "images"), str(images),
               "--num-workers", "0", "--out", str(metric)]
    return Refusal(command, [str(broken)], IMAGE_FIX, [metric])


@refusal
def truncated_safetensors(w: World, folder: Path) -> Refusal:
    backbone = folder / "backbone"
    shutil.copytree(w.backbone, backbone)
    truncate(backbone / "model.safetensors")
    images, record = folder / "images", folder / "0.json"
    return Refusal(w.generate_command(images, record, backbone=backbone), [str(backbone / "model.safetensors")],
                   rf"delete {re.escape(str(backbone))} and rerun the job that wrote it", [images, record])


@refusal
def truncated_index(w: World, folder: Path) -> Refusal:
    """Its fingerprint (.json) intact: the backbone's codebook passes the check, the index file is the error (so this
    case is also the control of `index_of_another_codebook`)."""
    index = folder / "index.tokens"
    for suffix in ("", ".json", ".values.npz"):
        shutil.copy(f"{w.index}{suffix}", f"{index}{suffix}")
    truncate(index)
    images, record = folder / "images", folder / "0.json"
    return Refusal(w.daid_command(images, record, index), [str(index)],
                   r"truncated or corrupt index file .*; delete .* and rebuild the index", [images, record])


@refusal
def exclusions_not_json(w: World, folder: Path) -> Refusal:
    exclusions = folder / "exclusions.json"
    exclusions.write_text(w.exclusions.read_text()[:200])  # cut short: not JSON
    shard = folder / "0.npz"
    return Refusal(w.encode_command(0, shard, exclusions), [str(exclusions)], r"rerun `arrag exclusion-list`",
                   [shard])


@refusal
def index_of_another_codebook(w: World, folder: Path) -> Refusal:
    """The backbone's VQ codes in reverse order: another codebook than the one the index was built with."""
    from safetensors.numpy import load_file, save_file

    backbone = folder / "backbone"
    shutil.copytree(w.backbone, backbone)
    weights = load_file(backbone / "model.safetensors")
    codebook = "model.vqmodel.quantize.embedding.weight"
    weights[codebook] = weights[codebook][::-1].copy()
    save_file(weights, backbone / "model.safetensors", metadata={"format": "pt"})
    images, record = folder / "images", folder / "0.json"
    return Refusal(w.daid_command(images, record, w.index, backbone), [str(w.index), "codebook_sha256"],
                   r"rebuild the index with this codebook", [images, record])


@refusal
def benchmark_id_leaving_the_output_folder(w: World, folder: Path) -> Refusal:
    """MJHQ's meta_data.json names the files (<category>/<id>.png): an id `../../escaped` would be written two
    folders up."""
    meta = json.loads((w.benchmarks / "mjhq" / "meta_data.json").read_text())
    first = next(iter(meta))
    bad = folder / "bench" / "meta_data.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({("../../escaped" if key == first else key): value for key, value in meta.items()}))
    images, record = folder / "out" / "images", folder / "out" / "0.json"
    return Refusal(w.generate_command(images, record, benchmark="mjhq", prompts=bad), [str(bad), "'../../escaped'"],
                   r"fix the entry in this file", [images, record], nothing_named="escaped")


@pytest.fixture(scope="module")
def refused(world, tmp_path_factory) -> dict[str, tuple[Refusal, Path, subprocess.CompletedProcess]]:
    """Every bad-input command run in its own folder (two at a time), by case."""
    folders = {name: tmp_path_factory.mktemp(name) for name in REFUSALS}
    cases = {name: make(world, folders[name]) for name, make in REFUSALS.items()}
    results = in_parallel(*[lambda name=name: run(cases[name].command, folders[name], check=False) for name in cases])
    return {name: (cases[name], folders[name], result) for name, result in zip(cases, results, strict=True)}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_input_is_refused_naming_the_file_and_the_fix(refused, case):
    bad, folder, result = refused[case]
    assert_refused(result, bad.names, bad.fix, bad.absent)
    if bad.nothing_named:
        assert [p for p in folder.rglob("*") if bad.nothing_named in p.name] == []


def test_benchmark_category_leaving_the_output_folder_is_refused(world, tmp_path):
    """The category is a folder of the output (<category>/<id>.png): the same check as the id's, in-process."""
    meta = json.loads((world.benchmarks / "mjhq" / "meta_data.json").read_text())
    first = next(iter(meta))
    meta[first] = {**meta[first], "category": "../../escaped"}
    bad = tmp_path / "meta_data.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(f"{bad}: entry {first!r}: category '../../escaped'")):
        prompt_items("mjhq", bad)


def misspell_a_key(config: dict) -> None:
    config["shapes"]["splits"]["databse"] = config["shapes"]["splits"].pop("database")


def mistype_a_value(config: dict) -> None:
    config["shapes"]["image_size"] = "sixty-four"


@pytest.mark.parametrize(("edit", "key", "fix"), [
    (misspell_a_key, "['databse'] in 'shapes.splits'", r"allowed keys: database, heldout, train"),
    (mistype_a_value, "'shapes.image_size' = 'sixty-four'", r"expected integer"),
], ids=["misspelt-key", "wrong-type"])
def test_bad_config_is_refused_naming_the_key_and_the_fix(tmp_path, edit, key, fix):
    """`snakemake -n` with the CI config edited: an error naming the key and what is allowed, nothing made. The
    same check where a config is read by path (`arrag.config.load`) names the file too."""
    config = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    edit(config)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n", "--cores", "1",
                  "--configfile", str(bad), "--directory", str(tmp_path)], tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert key in output and re.search(fix, output), output[-3000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()
    with pytest.raises(ConfigError) as error:
        load(bad)
    assert str(bad) in str(error.value) and key in str(error.value) and re.search(fix, str(error.value))
