"""CMMD, the CLIP maximum mean discrepancy, as google-research/google-research ``cmmd/`` (Jayasumana et al.).

Embedding, per image (io_util.py, embedding.py): decode as RGB; centre crop to the largest square; PIL
bicubic resize (uint8, antialiased) to the model's input size (336 for CLIP ViT-L/14@336); scale to [0, 1]
(float32 / 255); normalise with the model's mean and std (CLIP's); image embedding, L2-normalised:
[N, D] float32. The official reader tiles grayscale images and rejects other modes; here every image is
converted to RGB, which is the same for RGB and grayscale files.

Distance (distance.py, main.py): MMD with the Gaussian RBF kernel k(a, b) = exp(-||a - b||^2 / (2 sigma^2)),
sigma = 10, times scale = 1000, with the official biased estimator (means over all pairs, the diagonal
included). Computed in float64 (the official code runs in float32; see :func:`mmd`).

Batching: the official reader drops the last N mod batch_size images of each folder (batch size 32, top
folder only). Here every image is kept by default; ``--official-drop-remainder`` reproduces the dropping
(the first floor(N / batch_size) * batch_size images of each sorted list).

Model: any open_clip architecture name with an open_clip pretrained tag or a checkpoint path; a custom
architecture (e.g. the Shapes CLIP) is registered from its open_clip config JSON with ``--model-config``.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from evaluators.features import (
    cached_features,
    default_cache_dir,
    default_device,
    default_num_workers,
    extract_features,
)
from evaluators.io import file_list_hash, list_images, sha256_file

SIGMA = 10.0
SCALE = 1000.0
DEFAULT_MODEL = "ViT-L-14-336-quickgelu"  # OpenAI CLIP ViT-L/14@336 uses QuickGELU
DEFAULT_PRETRAINED = "openai"
_ROW_BLOCK = 1024  # rows of the kernel matrix held at once by mmd()


def mmd(x: np.ndarray, y: np.ndarray, sigma: float = SIGMA, scale: float = SCALE) -> float:
    """scale * (mean k(x_i, x_j) + mean k(y_i, y_j) - 2 mean k(x_i, y_j)), the official biased estimator.

    x: [N, D], y: [M, D] embeddings; k(a, b) = exp(-||a - b||^2 / (2 sigma^2)) with the squared distance
    expanded as |a|^2 + |b|^2 - 2 a.b, as the official code does. Means run over all N^2, M^2, N*M pairs,
    diagonals included. float64 throughout, in row blocks to bound memory: with unit embeddings the kernel
    values lie in [exp(-2 / sigma^2), 1] and the three means nearly cancel, which costs float32 (the
    official precision) some 1e-5 to 1e-3 of the result.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    gamma = 1.0 / (2.0 * sigma**2)

    def mean_kernel(a: np.ndarray, b: np.ndarray) -> float:
        a_sq, b_sq = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
        total = 0.0
        for start in range(0, len(a), _ROW_BLOCK):
            rows = slice(start, start + _ROW_BLOCK)
            sq_dist = -2.0 * (a[rows] @ b.T) + a_sq[rows, None] + b_sq[None, :]
            total += float(np.exp(-gamma * sq_dist).sum())
        return total / (len(a) * len(b))

    return scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2.0 * mean_kernel(x, y))


@dataclass(frozen=True)
class ClipTransform:
    """RGB image -> [3, size, size] float32: centre square crop, PIL bicubic resize, / 255, normalise."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((self.size, self.size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (pixels - mean) / std


@dataclass(frozen=True)
class ClipModel:
    """A loaded open_clip model with what identifies it."""

    model: torch.nn.Module
    name: str
    pretrained: str
    weights_file: Path
    transform: ClipTransform

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] preprocessed images -> [B, D] L2-normalised embeddings."""
        return F.normalize(self.model.encode_image(images).float(), dim=-1)


def load_clip(model: str | None = None, pretrained: str | None = None, model_config: str | Path | None = None,
              device: torch.device | str = "cpu") -> ClipModel:
    """An open_clip model: architecture `model` (default ViT-L-14-336-quickgelu with tag "openai", the
    official CMMD model), weights `pretrained` (an open_clip tag or a checkpoint file). `model_config`
    registers a custom architecture from an open_clip config JSON (keys embed_dim, vision_cfg, text_cfg);
    `model` then defaults to its file stem. A tag trained with another activation (QuickGELU) than the
    architecture is an error, not open_clip's warning.
    """
    if model_config is not None:
        open_clip.add_model_config(Path(model_config))
        model = model or Path(model_config).stem
    if model is None:
        model, pretrained = DEFAULT_MODEL, pretrained or DEFAULT_PRETRAINED
    if pretrained is None:
        raise ValueError(f"model {model}: give --pretrained (an open_clip tag or a checkpoint file)")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="QuickGELU mismatch")
        clip = open_clip.create_model(model, pretrained=pretrained, device=device).eval()
    if Path(pretrained).is_file():
        weights_file = Path(pretrained)
    else:
        weights_file = Path(open_clip.download_pretrained(open_clip.get_pretrained_cfg(model, pretrained)))
    preprocess = open_clip.get_model_preprocess_cfg(clip)
    size = preprocess["size"]
    if not isinstance(size, int):
        if size[0] != size[1]:
            raise ValueError(f"model {model}: non-square input size {size} is not supported")
        size = size[0]
    transform = ClipTransform(size, tuple(preprocess["mean"]), tuple(preprocess["std"]))
    return ClipModel(clip, model, pretrained, weights_file, transform)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("real_dir", type=Path, help="reference images (read recursively)")
    parser.add_argument("gen_dir", type=Path, help="generated images (read recursively)")
    parser.add_argument("--model", help=f"open_clip architecture (default {DEFAULT_MODEL}, "
                        "or the file stem of --model-config)")
    parser.add_argument("--pretrained", help="open_clip tag or checkpoint file "
                        f"(default {DEFAULT_PRETRAINED} for the default model)")
    parser.add_argument("--model-config", type=Path, help="open_clip config JSON of a custom architecture")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--official-drop-remainder", action="store_true",
                        help="drop the last N mod batch-size images of each folder, as the official reader")
    parser.add_argument("--num-workers", type=int, default=default_num_workers())
    parser.add_argument("--device", default=str(default_device()))
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="reference embedding cache (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the cache")


def run(args: argparse.Namespace) -> dict:
    real_files, gen_files = list_images(args.real_dir), list_images(args.gen_dir)
    if args.official_drop_remainder:
        real_files = real_files[: len(real_files) // args.batch_size * args.batch_size]
        gen_files = gen_files[: len(gen_files) // args.batch_size * args.batch_size]
        if not real_files or not gen_files:
            raise ValueError(f"--official-drop-remainder with batch size {args.batch_size} leaves no images")
    device = torch.device(args.device)
    clip = load_clip(args.model, args.pretrained, args.model_config, device)
    weights_sha256 = sha256_file(clip.weights_file)

    def embeddings_of(files: list[Path], desc: str) -> np.ndarray:
        return extract_features(files, clip.transform, clip.embed, device, args.batch_size, args.num_workers,
                                desc)

    real_hash = file_list_hash(real_files, args.real_dir)
    real_rel = [p.relative_to(args.real_dir).as_posix() for p in real_files]
    key = {"metric": "cmmd", "files": real_hash, "model": clip.name, "weights_sha256": weights_sha256,
           "transform": [clip.transform.size, clip.transform.mean, clip.transform.std]}
    cache_dir = None if args.no_cache else args.cache_dir
    real_emb, cache_file = cached_features(cache_dir, key, real_rel,
                                           lambda: embeddings_of(real_files, "CMMD real"))
    gen_emb = embeddings_of(gen_files, "CMMD gen")
    return {
        "values": {"cmmd": mmd(real_emb, gen_emb)},
        "n_images": {"real": len(real_files), "gen": len(gen_files)},
        "settings": {
            "model": clip.name,
            "pretrained": clip.pretrained if not Path(clip.pretrained).is_file() else clip.weights_file.name,
            "image_size": clip.transform.size,
            "mean": list(clip.transform.mean),
            "std": list(clip.transform.std),
            "resize": "centre square crop, PIL bicubic",
            "embedding": f"L2-normalised, {real_emb.shape[1]}-d",
            "kernel": "gaussian_rbf",
            "sigma": SIGMA,
            "scale": SCALE,
            "estimator": "biased (all pairs, diagonal included)",
            "dtype": "float64",
            "drop_remainder": args.official_drop_remainder,
            "batch_size": args.batch_size,
        },
        "inputs": {
            "real_dir": str(args.real_dir),
            "gen_dir": str(args.gen_dir),
            "real_files_sha256": real_hash,
            "gen_files_sha256": file_list_hash(gen_files, args.gen_dir),
            "real_cache": str(cache_file) if cache_file else None,
        },
        "weights_sha256": {"clip": weights_sha256},
    }
