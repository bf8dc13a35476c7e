"""The VQ tokens of a split's images, encoded once and read by every job that trains on them.

`arrag tokenize` (a workflow rule) writes one .npz per split and VQ; the Shapes LM and Show-o trainers, the
FAiD retrieval precomputation and the RA-CM3 and masked-FAiD fine-tunes read their rows from it instead of
encoding the same images again (each of them used to spend 30-45 s of two cores on it in the demo).

File: names [M] (image file names, unique within a split), tokens [M, N] int32 (raster order), image_size (the
side the images were squared to) and vq_fingerprint (sha256 of the VQ's weights). A reader checks both against
its own VQ and size, so tokens of another tokenizer are refused instead of trained on.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from arrag.models.vq import encode_images
from arrag.patchdb.encode import save_npz_atomic
from arrag.training.vq import to_model_input
from evaluators.io import load_rgb


def load_square(path: str | Path, size: int) -> np.ndarray:
    """An image as uint8 [size, size, 3]: centre square crop, then bicubic resize when the side differs."""
    image = load_rgb(path)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image)


@torch.no_grad()
def encode_files(vq: nn.Module, files: list[Path], size: int, batch_size: int = 64) -> torch.Tensor:
    """Image files -> their tokens [n, N] under a Janus VQ (squared to `size` pixels, raster order, on the CPU),
    read and encoded in batches on the VQ's device."""
    device = next(vq.parameters()).device
    chunks = []
    for start in tqdm(range(0, len(files), batch_size), desc="VQ-tokenise images", mininterval=5,
                      disable=len(files) <= batch_size):
        images = torch.from_numpy(np.stack([load_square(f, size) for f in files[start:start + batch_size]]))
        chunks.append(encode_images(vq, to_model_input(images).to(device)).flatten(1).cpu())
    return torch.cat(chunks)


def vq_fingerprint(vq: nn.Module) -> str:
    """sha256 of a VQ's state dict (names, dtypes, shapes and values, in name order): equal for equal weights
    whichever checkpoint or backbone they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vq.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def write_split_tokens(path: str | Path, vq: nn.Module, files: list[Path], size: int) -> dict:
    """Encode `files` (squared to `size` pixels) and write them to `path` atomically; returns a summary."""
    names = [Path(f).name for f in files]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"image file names must be unique within a split: {duplicates[:5]} repeat")
    tokens = encode_files(vq, files, size)
    save_npz_atomic(path, names=np.array(names, dtype=str), tokens=tokens.numpy().astype(np.int32),
                    image_size=np.int64(size), vq_fingerprint=np.array(vq_fingerprint(vq)))
    return {"images": len(names), "tokens_per_image": int(tokens.shape[1]), "image_size": size,
            "codes_used": int(tokens.unique().numel())}


def image_tokens(vq: nn.Module, files: list[Path], size: int, tokens_file: str | Path | None = None) -> torch.Tensor:
    """Tokens [n, N] (long) of `files` under `vq` at `size` pixels: the rows of `tokens_file` named by the files'
    names when given (checked against `vq` and `size`), else encoded now."""
    if tokens_file is None:
        return encode_files(vq, files, size)
    with np.load(tokens_file) as stored:
        names, tokens = stored["names"].tolist(), stored["tokens"]
        stored_size, fingerprint = int(stored["image_size"]), str(stored["vq_fingerprint"])
    if stored_size != size:
        raise ValueError(f"{tokens_file}: tokens of {stored_size}px images, this job needs {size}px; "
                         "re-run `arrag tokenize` with --size")
    if fingerprint != vq_fingerprint(vq):
        raise ValueError(f"{tokens_file}: made with another VQ (weights differ from this job's); "
                         "re-run `arrag tokenize` with this job's VQ")
    row_of = {name: row for row, name in enumerate(names)}
    missing = [Path(f).name for f in files if Path(f).name not in row_of]
    if missing:
        raise ValueError(f"{tokens_file}: no tokens for {len(missing)} images ({missing[:3]}...); "
                         "re-run `arrag tokenize` on this split")
    return torch.from_numpy(tokens[[row_of[Path(f).name] for f in files]]).long()
