"""Prompts to images in each evaluator's layout: batched, sharded, resumable, with provenance records.

Work is cut into *micro-batches* formed from the prompt order alone (a fixed number of images each), and
shard i of N takes micro-batches i, i + N, i + 2N, ... Every image's seed derives from (global seed,
prompt id, sample index) and the decode loop samples each row with its own generator, so neither the
shard count nor resuming changes an image: a micro-batch always holds the same images. (Changing the
micro-batch size may change images through floating-point differences of batched matrix products.)

A micro-batch whose files all exist is skipped; files are written to a temporary name and renamed, so a
killed job leaves no partial image. Each micro-batch's wall time is kept beside the images folder
(`<images>.timings/<n>.json`, outside it so that the official scripts see only their layout), so a record's
`generation_seconds` covers every image of the shard even when a rerun reuses them (Table 4 is rendered from
these records). Layouts (the official ones):
    geneval   <images>/<index:05d>/metadata.jsonl and <images>/<index:05d>/samples/<k:04d>.png
    dpg       <images>/<item_id>.png, a 2x2 grid of 4 samples
    mjhq      <images>/<category>/<id>.png (mjhq_ablation: the first `ablation_subset` prompts)
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from arrag.benchmarks import PromptItem, load_geneval_metadata, prompt_items
from arrag.models.janus import JanusBackbone, SamplingConfig, derive_seed, generate_tokens
from arrag.models.vq import decode_tokens
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


def units_for(benchmark: str, items: list[PromptItem], samples_per_prompt: int, ablation_subset: int) -> list[Unit]:
    """Every image to generate, in prompt order. A DPG prompt's 4 samples share its grid file."""
    if benchmark == "geneval":
        return [Unit(item, k, f"{item.id}/samples/{k:04d}.png") for item in items for k in range(samples_per_prompt)]
    if benchmark == "dpg":
        return [Unit(item, k, f"{item.id}.png") for item in items for k in range(DPG_GRID * DPG_GRID)]
    if benchmark == "mjhq_ablation":
        items = items[:ablation_subset]
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
    """GenEval's per-prompt `<index>/metadata.jsonl` (the prompt's metadata line), written once."""
    for item, row in zip(items, load_geneval_metadata(metadata_path), strict=True):
        target = out / item.id / "metadata.jsonl"
        if not target.is_file():
            write_bytes_atomic(target, (json.dumps(row) + "\n").encode())


def weights_sha256(source: str) -> dict[str, str]:
    """sha256 of every safetensors file of a local model folder (hub ids: resolved by the fetch step)."""
    folder = Path(source)
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))} if folder.is_dir() else {}


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
) -> dict:
    """Generate shard `shard` of `shards`; returns its provenance record (see `gather_records`).

    `method_inputs(prompts) -> dict` gives extra keyword arguments of `generate_tokens` for a micro-batch's
    prompts (RA-CM3: its retrieved ``prefix_image_tokens``); it runs inside the timed region, so retrieval
    counts in the method's generation time. `method_settings` is recorded as is. Another backbone (Show-o)
    passes `generate_images(prompts, seeds) -> images` instead of the Janus decode loop; `backbone` then only
    names the model in the record (`source`, `revision`, `model.device`) and `sampling` is any dataclass.
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
    batches = micro_batches(units_for(benchmark, items, samples_per_prompt, ablation_subset), micro_batch, benchmark)
    files, generated, skipped, seconds, timed = [], 0, 0, 0.0, 0
    for number in tqdm(range(shard, len(batches), shards), desc=f"generate {benchmark}/{method} shard {shard}/{shards}",
                       unit="batch"):
        batch = batches[number]
        paths = sorted({u.path for u in batch})
        files += paths
        timing = out.with_name(out.name + TIMINGS_SUFFIX) / f"{number:06d}.json"
        if all((out / p).is_file() for p in paths) and timing.is_file():
            skipped += len(batch)
        else:
            started = time.perf_counter()
            seeds = [derive_seed(seed, u.item.id, u.index) for u in batch]
            images = generate_images([u.item.prompt for u in batch], seeds)
            elapsed = time.perf_counter() - started
            write_batch(batch, images, out, benchmark)
            write_json_atomic(timing, {"images": len(batch), "seconds": elapsed, "device": str(backbone.model.device)})
            generated += len(batch)
        batch_timing = json.loads(timing.read_text())
        seconds += batch_timing["seconds"]
        timed += batch_timing["images"]
    return {
        "benchmark": benchmark, "method": method, "variant": variant, "shard": shard, "shards": shards,
        "images_generated": generated, "images_skipped": skipped, "images_timed": timed,
        "generation_seconds": round(seconds, 4),
        "files": files, "micro_batch": micro_batch, "seed": seed, "sampling": asdict(sampling),
        "method_settings": method_settings or {},
        "model": {"source": backbone.source, "revision": backbone.revision,
                  "weights_sha256": weights_sha256(backbone.source)},
        "device": str(backbone.model.device), "python": platform.python_version(), "versions": package_versions(),
        "git_commit": git_commit(),
    }
