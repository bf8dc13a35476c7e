"""Batched feature extraction shared by the metrics, and the cache of reference features.

Images are decoded (strictly, :func:`evaluators.io.load_rgb`) and transformed in DataLoader workers,
batched in file order, and passed to the model on the GPU when one is present, with a tqdm progress
bar on stderr (stdout carries the JSON record).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from evaluators.io import load_rgb, write_bytes_atomic


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_num_workers() -> int:
    """DataLoader workers for decoding and resizing: the usable CPUs, at most 8."""
    return min(8, len(os.sched_getaffinity(0)))


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "arrag-evaluators"


class ImageFiles(Dataset):
    """`transform(load_rgb(files[i]))` for each file; `transform` must be picklable (DataLoader workers)."""

    def __init__(self, files: list[Path], transform: Callable):
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_rgb(self.files[index]))


def iterate_batches(
    files: list[Path], transform: Callable, batch_size: int, num_workers: int, desc: str
) -> Iterator[torch.Tensor]:
    """Batches of transformed images in file order (the last one may be smaller), with a progress bar."""
    loader = DataLoader(
        ImageFiles(files, transform),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    with tqdm(total=len(files), desc=desc, unit="img") as progress:
        for batch in loader:
            yield batch
            progress.update(len(batch))


@torch.no_grad()
def extract_features(
    files: list[Path],
    transform: Callable,
    model: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    batch_size: int,
    num_workers: int,
    desc: str,
) -> np.ndarray:
    """Features [N, D] float32 of `files`, in file order: `model(batch.to(device))` batch by batch."""
    features = [
        model(batch.to(device)).float().cpu().numpy()
        for batch in iterate_batches(files, transform, batch_size, num_workers, desc)
    ]
    return np.concatenate(features)


def cached_features(
    cache_dir: Path | None, key: dict, rel_paths: list[str], compute: Callable[[], np.ndarray]
) -> tuple[np.ndarray, Path | None]:
    """Features of a reference folder, read from `cache_dir` when present, else computed and stored.

    key: everything the features depend on (metric, content hash of the files, model and weights hash,
    preprocessing); the file name is a hash of it. The stored relative paths must equal `rel_paths`, else the entry is
    recomputed. Returns the features and the cache file (None when `cache_dir` is None: caching off).
    One process computes an entry while the others that need it wait on its lock file and then read it: metric jobs
    that start together against the same references (every FID of a run) compute the features once.
    """
    if cache_dir is None:
        return compute(), None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"{key['metric']}-{digest}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        if path.is_file():
            with np.load(path) as stored:
                if stored["files"].tolist() == rel_paths:
                    return stored["features"], path
        features = compute()
        buffer = io.BytesIO()
        np.savez(buffer, features=features, files=np.array(rel_paths, dtype=str), key=json.dumps(key))
        write_bytes_atomic(path, buffer.getvalue())
    return features, path
