"""Generation records without the model stack: merging the shard records of one (benchmark, method, variant) into
its record (Table 4 reads the timings) and the sample grid beside it. Imports neither torch nor transformers, so
the workflow's many gather jobs start in a fraction of a second."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from evaluators.io import load_rgb, write_bytes_atomic, write_json_atomic


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def gather_records(shard_records: list[str | Path], out: str | Path, images_dir: str | Path) -> dict:
    """Merge shard records into one generation record (Table 4 reads its timings) and write a sample grid."""
    records = [json.loads(Path(p).read_text()) for p in shard_records]
    first = records[0]
    files = sorted(f for r in records for f in r["files"])
    if len(files) != len(set(files)):
        raise ValueError("shards overlap: the same file appears in two shard records")
    total = sum(r["images_timed"] for r in records)
    seconds = sum(r["generation_seconds"] for r in records)
    merged = {key: first[key] for key in ("benchmark", "method", "variant", "seed", "sampling", "model",
                                          "method_settings", "micro_batch", "device", "precision", "machine",
                                          "versions", "git_commit")}
    merged.update({"shards": len(records), "files": files, "images": len(files),
                   "images_generated": sum(r["images_generated"] for r in records), "images_timed": total,
                   "generation_seconds": round(seconds, 4),
                   "seconds_per_image": round(seconds / total, 6) if total else None})
    # the grid first: it decodes images, and a corrupt one must leave no record behind
    write_sample_grid([Path(images_dir) / f for f in files[:16]], Path(out).with_name("sample_grid.png"))
    write_json_atomic(out, merged)
    return merged


def write_sample_grid(paths: list[Path], target: Path, columns: int = 8) -> None:
    """The given images side by side (up to `columns` per row), 2x upscaled with nearest neighbours."""
    tiles = [np.asarray(load_rgb(p)) for p in paths]
    if not tiles:
        return
    height, width = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    rows = -(-len(tiles) // columns)
    canvas = np.full((rows * height, min(columns, len(tiles)) * width, 3), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        canvas[r * height:r * height + tile.shape[0], c * width:c * width + tile.shape[1]] = tile
    image = Image.fromarray(canvas)
    write_bytes_atomic(target, png_bytes(image.resize((image.width * 2, image.height * 2), Image.NEAREST)))
