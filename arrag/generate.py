"""Prompts to images in each evaluator's layout: batched, sharded, resumable, with provenance records.

Work is cut into *micro-batches* formed from the prompt order alone (a fixed number of images each), and
shard i of N takes micro-batches i, i + N, i + 2N, ... Every image's seed derives from (global seed,
prompt id, sample index) and the decode loop samples each row with its own generator, so neither the
shard count nor resuming changes an image: a micro-batch always holds the same images. (Changing the
micro-batch size may change images through floating-point differences of batched matrix products.)

A micro-batch whose files all exist is skipped when it was made by the same models, settings and code: each
micro-batch's record (`<images>.timings/<n>.json`, beside the images folder so that the official scripts see
only their layout) holds its wall time and the *fingerprint* of what made it (sha256 of the backbone's and the
method's input files, the sampling and method settings, seed, micro-batch size, precision, device type and the
source `arrag generate` runs, `arrag.codehash`); a micro-batch of another fingerprint is generated again, and
images the prompts no longer ask for are removed, so a rerun after any change never reuses an image made before
it. Files are written to a temporary name and renamed, so a killed job leaves no partial image, and the record
is written after the images. A record's `generation_seconds` covers every image of the shard even when a rerun
reuses them (Table 4 is rendered from these records). Layouts (the official ones):
    geneval   <images>/<index:05d>/metadata.jsonl and <images>/<index:05d>/samples/<k:04d>.png
    dpg       <images>/<item_id>.png, a 2x2 grid of 4 samples
    mjhq      <images>/<category>/<id>.png (mjhq_ablation: `ablation_subset` prompts stratified by category,
              `arrag.benchmarks.stratified_subset` with the run's seed)
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from arrag.benchmarks import PromptItem, load_geneval_metadata, prompt_items, stratified_subset
from arrag.codehash import code_hash
from arrag.models.janus import JanusBackbone, SamplingConfig, derive_seed, generate_tokens
from arrag.models.vq import decode_tokens
from arrag.precision import machine, precision_of
from arrag.records import png_bytes
from evaluators.io import sha256_file, write_bytes_atomic, write_json_atomic
from evaluators.record import git_commit, package_versions

DPG_GRID = 2  # DPG-Bench images are 2x2 grids of samples
TIMINGS_SUFFIX = ".timings"  # per-micro-batch wall times, in a folder beside the images folder


@dataclass(frozen=True)
class Unit:
    """One generated image: prompt `item`, sample `index`, written to `path` (relative to the images dir)."""

    item: PromptItem
    index: int
    path: str


def units_for(benchmark: str, items: list[PromptItem], samples_per_prompt: int, ablation_subset: int,
              seed: int = 0) -> list[Unit]:
    """Every image to generate, in prompt order. A DPG prompt's 4 samples share its grid file."""
    if benchmark == "geneval":
        return [Unit(item, k, f"{item.id}/samples/{k:04d}.png") for item in items for k in range(samples_per_prompt)]
    if benchmark == "dpg":
        return [Unit(item, k, f"{item.id}.png") for item in items for k in range(DPG_GRID * DPG_GRID)]
    if benchmark == "mjhq_ablation":
        items = stratified_subset(items, ablation_subset, seed)
    return [Unit(item, 0, f"{item.category}/{item.id}.png") for item in items]


def micro_batches(units: list[Unit], size: int, benchmark: str) -> list[list[Unit]]:
    """Consecutive groups of about `size` images; a DPG grid's samples are never split across groups."""
    if benchmark == "dpg":
        size = max(DPG_GRID * DPG_GRID, size - size % (DPG_GRID * DPG_GRID))
    return [units[i:i + size] for i in range(0, len(units), size)]


def to_images(backbone: JanusBackbone, tokens: torch.Tensor) -> list[Image.Image]:
    """Token rows [B, N] -> RGB images via the backbone's VQ decoder."""
    return tokens_to_images(backbone.vq, tokens, backbone.grid_size)


def tokens_to_images(vq: torch.nn.Module, tokens: torch.Tensor, grid: int) -> list[Image.Image]:
    """Token rows [B, grid * grid] -> RGB images via a Janus VQ decoder (on the VQ's device)."""
    pixels = decode_tokens(vq, tokens.view(-1, grid, grid).to(next(vq.parameters()).device))
    array = ((pixels.float().permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def write_batch(units: list[Unit], images: list[Image.Image], out: Path, benchmark: str) -> list[str]:
    """Write a micro-batch's files atomically; returns the files written."""
    written = []
    if benchmark == "dpg":
        for start in range(0, len(units), DPG_GRID * DPG_GRID):
            tiles = images[start:start + DPG_GRID * DPG_GRID]
            side = tiles[0].width
            grid = Image.new("RGB", (side * DPG_GRID, side * DPG_GRID))
            for k, tile in enumerate(tiles):
                grid.paste(tile, ((k % DPG_GRID) * side, (k // DPG_GRID) * side))
            write_bytes_atomic(out / units[start].path, png_bytes(grid))
            written.append(units[start].path)
        return written
    for unit, image in zip(units, images, strict=True):
        write_bytes_atomic(out / unit.path, png_bytes(image))
        written.append(unit.path)
    return written


def write_geneval_metadata(metadata_path: Path, items: list[PromptItem], out: Path) -> None:
    """GenEval's per-prompt `<index>/metadata.jsonl` (the prompt's metadata line), written when it differs."""
    for item, row in zip(items, load_geneval_metadata(metadata_path), strict=True):
        target, content = out / item.id / "metadata.jsonl", (json.dumps(row) + "\n").encode()
        if not (target.is_file() and target.read_bytes() == content):
            write_bytes_atomic(target, content)


def path_sha256(path: str | Path) -> str:
    """sha256 of a file's content, or of a folder's files (relative paths and contents, recursively)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\t{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def inputs_sha256(paths: dict[str, str | Path | list]) -> dict[str, str]:
    """name -> sha256 (`path_sha256`) of a generation's input files and folders; an index file brings its
    sidecars (`<index>.json`, `.values.npz`, ...); names of lists get `[i]`. Hub ids (not on disk) are skipped:
    their revision is recorded."""
    hashes = {}
    for name, value in paths.items():
        for i, path in enumerate(value if isinstance(value, list) else [value]):
            key = f"{name}[{i}]" if isinstance(value, list) else name
            path = Path(path)
            if not path.exists():
                continue
            hashes[key] = path_sha256(path)
            if name == "index":
                for sidecar in sorted(path.parent.glob(path.name + ".*")):
                    hashes[f"{key}{sidecar.name[len(path.name):]}"] = path_sha256(sidecar)
    return hashes


def weights_sha256(source: str) -> dict[str, str]:
    """sha256 of every safetensors file of a local model folder (hub ids: resolved by the fetch step)."""
    folder = Path(source)
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))} if folder.is_dir() else {}


def made_with(timing: Path) -> str | None:
    """The fingerprint in a micro-batch's record, or None when there is no readable record."""
    try:
        return json.loads(timing.read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def remove_unplanned(out: Path, planned: set[str]) -> None:
    """Delete the images under `out` that the plan (every shard's files) does not hold: left by a run with other
    prompts or sizes, they would be scored with this run's."""
    if not out.is_dir():
        return
    for path in out.rglob("*.png"):
        if path.relative_to(out).as_posix() not in planned:
            path.unlink(missing_ok=True)


def remove_temporaries(folder: Path, names: list[str]) -> None:
    """Remove what a killed `write_bytes_atomic` left of the files `names` (relative to `folder`): their
    `.<name>.<random>.tmp` siblings. Callers pass only their own shard's files, which no other job writes."""
    by_folder: dict[Path, set[str]] = {}
    for name in names:
        by_folder.setdefault((folder / name).parent, set()).add(Path(name).name)
    for parent, own in by_folder.items():
        for temporary in parent.glob(".*.tmp") if parent.is_dir() else []:
            if temporary.name[1:-len(".tmp")].rsplit(".", 1)[0] in own:
                temporary.unlink(missing_ok=True)


def generate_shard(
    backbone: JanusBackbone,
    benchmark: str,
    prompts: str | Path,
    images_dir: str | Path,
    shard: int,
    shards: int,
    seed: int,
    sampling: SamplingConfig,
    micro_batch: int,
    samples_per_prompt: int = 4,
    ablation_subset: int = 0,
    method: str = "vanilla",
    variant: str = "default",
    method_inputs: Callable[[list[str]], dict] | None = None,
    method_settings: dict | None = None,
    generate_images: Callable[[list[str], list[int]], list[Image.Image]] | None = None,
    inputs: dict[str, str] | None = None,
) -> dict:
    """Generate shard `shard` of `shards`; returns its provenance record (see `gather_records`).

    `method_inputs(prompts) -> dict` gives extra keyword arguments of `generate_tokens` for a micro-batch's
    prompts (RA-CM3: its retrieved ``prefix_image_tokens``); it runs inside the timed region, so retrieval
    counts in the method's generation time. `method_settings` is recorded as is. Another backbone (Show-o)
    passes `generate_images(prompts, seeds) -> images` instead of the Janus decode loop; `backbone` then only
    names the model in the record (`source`, `revision`, `model.device`) and `sampling` is any dataclass.
    `inputs`: sha256 of the method's input files (`inputs_sha256`), part of the fingerprint with the backbone's.
    """
    if generate_images is None:
        def generate_images(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
            extra = method_inputs(prompts) if method_inputs is not None else {}
            return to_images(backbone, generate_tokens(backbone, prompts, seeds, sampling, **extra))

    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    out = Path(images_dir)
    items = prompt_items("mjhq" if benchmark == "mjhq_ablation" else benchmark, prompts)
    if benchmark == "geneval":
        write_geneval_metadata(Path(prompts), items, out)
    units = units_for(benchmark, items, samples_per_prompt, ablation_subset, seed)
    batches = micro_batches(units, micro_batch, benchmark)
    model = {"source": backbone.source, "revision": backbone.revision,
             "weights_sha256": weights_sha256(backbone.source)}
    made_by = {"model": model, "inputs_sha256": inputs or {}, "method": method, "variant": variant,
               "method_settings": method_settings or {}, "sampling": asdict(sampling), "seed": seed,
               "micro_batch": micro_batch, "precision": precision_of(backbone.model),
               "device": backbone.model.device.type, "code": code_hash("generate")}
    fingerprint = hashlib.sha256(json.dumps(made_by, sort_keys=True, default=str).encode()).hexdigest()
    remove_unplanned(out, {u.path for u in units})
    mine = range(shard, len(batches), shards)
    remove_temporaries(out, [u.path for number in mine for u in batches[number]])
    remove_temporaries(out.with_name(out.name + TIMINGS_SUFFIX), [f"{number:06d}.json" for number in mine])
    files, generated, skipped, seconds, timed = [], 0, 0, 0.0, 0
    for number in tqdm(range(shard, len(batches), shards), desc=f"generate {benchmark}/{method} shard {shard}/{shards}",
                       unit="batch"):
        batch = batches[number]
        paths = sorted({u.path for u in batch})
        files += paths
        timing = out.with_name(out.name + TIMINGS_SUFFIX) / f"{number:06d}.json"
        if all((out / p).is_file() for p in paths) and made_with(timing) == fingerprint:
            skipped += len(batch)
        else:
            started = time.perf_counter()
            seeds = [derive_seed(seed, u.item.id, u.index) for u in batch]
            images = generate_images([u.item.prompt for u in batch], seeds)
            elapsed = time.perf_counter() - started
            write_batch(batch, images, out, benchmark)
            write_json_atomic(timing, {"images": len(batch), "seconds": elapsed, "device": str(backbone.model.device),
                                       "fingerprint": fingerprint})
            generated += len(batch)
        batch_timing = json.loads(timing.read_text())
        seconds += batch_timing["seconds"]
        timed += batch_timing["images"]
    return {
        "benchmark": benchmark, "method": method, "variant": variant, "shard": shard, "shards": shards,
        "images_generated": generated, "images_skipped": skipped, "images_timed": timed,
        "generation_seconds": round(seconds, 4),
        "files": files, "micro_batch": micro_batch, "seed": seed, "sampling": asdict(sampling),
        "method_settings": method_settings or {}, "model": model, "inputs_sha256": inputs or {},
        "fingerprint": fingerprint, "code": made_by["code"],
        "device": str(backbone.model.device), "precision": precision_of(backbone.model),
        "machine": machine(backbone.model.device), "python": platform.python_version(), "versions": package_versions(),
        "git_commit": git_commit(),
    }
