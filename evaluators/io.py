"""Image folders and result files: recursive sorted listing, strict decoding, atomic writes.

Nothing here imports `arrag`: the evaluators are usable on their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(folder: str | Path) -> list[Path]:
    """All png/jpg/jpeg files under `folder` (recursive), sorted by their path relative to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    files.sort(key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise ValueError(f"no .png/.jpg/.jpeg images under {folder}")
    return files


def load_rgb(path: str | Path) -> Image.Image:
    """Decode one image fully as RGB; a file that cannot be decoded (truncated, corrupt) is an error naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as err:  # PIL raises several types for truncated or corrupt files
        raise ValueError(f"{path}: not a valid image ({err}); delete it and rerun the job that wrote it (with "
                         "Snakemake: --forcerun that rule)") from err


def file_list_hash(files: list[Path], root: str | Path) -> str:
    """sha256 over the relative paths and the contents (sha256) of `files`, in their order: it identifies what a
    folder's images are, so a reference file replaced by another of the same name and size changes it (the key
    of the cached reference features). Reads every file once (about 1 GB/s)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{Path(path).relative_to(root).as_posix()}\t{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
