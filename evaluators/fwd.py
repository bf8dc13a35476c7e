"""Fréchet Wavelet Distance, as pytorchfwd 1.0.1 (BonnBytes/PyTorch-FWD; Veeramacheneni et al.).

Per image: decode as RGB; optionally resize to RESIZE x RESIZE (pytorchfwd ``--resize``:
torchvision ``Resize`` on the PIL image, i.e. PIL bilinear on uint8); scale to [0, 1] in float64;
2D wavelet packet transform of each channel to `level` (default 4) with the `wavelet` (default Haar),
boundary mode "reflect" (ptwt 0.1.8's default, which pytorchfwd uses; PyWavelets' "reflect" gives the
same coefficients). Each of the 4^level packets is a feature vector of C * h * w coefficients.
Per packet: mean and covariance (unbiased, float64) over the images of each folder; FWD is the
Fréchet distance per packet, averaged over the packets. Its trace term Tr((S1 S2)^(1/2)) comes from symmetric
eigendecompositions (`evaluators.fid.frechet_distance_psd`): the same value as pytorchfwd's scipy sqrtm where that
succeeds, and finite where it does not (with fewer images than a packet's C * h * w dimensions the covariances are
rank-deficient, sqrtm of their product turns complex and pytorchfwd raises; seen on 16 Shapes images, 48-d
packets). ``--sqrtm`` reproduces pytorchfwd's computation, failure included.

Resize policy: none by default, and then every image of both folders must have one size (pytorchfwd
has no default resize either). Folders are read recursively; pytorchfwd reads only the top folder (and
only lower-case extensions): on such flat folders the two read the same images.

The covariance is accumulated batch by batch (merging batch means and centred cross-products, Chan et
al.) on the GPU when present; it holds 4^level * D^2 float64 numbers, D = 3 * H * W / 4^level: 1.2 GB
for 256 x 256 images at level 4, 19 GB at 512 x 512.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import pywt
import torch
from PIL import Image
from tqdm import tqdm

from evaluators.features import default_device, default_num_workers, iterate_batches
from evaluators.fid import frechet_distance, frechet_distance_psd
from evaluators.io import file_list_hash, list_images

BOUNDARY_MODE = "reflect"


@dataclass(frozen=True)
class PacketTransform:
    """RGB image -> wavelet packets [4^level, 3, h, w] float64 of the image in [0, 1], natural order."""

    wavelet: str = "haar"
    level: int = 4
    resize: int | None = None
    log_scale: bool = False

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.resize is not None:
            image = image.resize((self.resize, self.resize), Image.BILINEAR)
        nodes = {"": np.asarray(image, dtype=np.float64).transpose(2, 0, 1) / 255.0}
        for _ in range(self.level):
            children = {}
            for path, data in nodes.items():
                approx, (horizontal, vertical, diagonal) = pywt.dwt2(data, self.wavelet, mode=BOUNDARY_MODE)
                children.update({path + "a": approx, path + "h": horizontal, path + "v": vertical,
                                 path + "d": diagonal})
            nodes = children
        order = ["".join(p) for p in product("ahvd", repeat=self.level)]
        packets = torch.from_numpy(np.stack([nodes[path] for path in order]))
        if self.log_scale:
            packets = torch.log(torch.abs(packets) + 1e-6)
        return packets


class PacketStatistics:
    """Running per-packet mean [P, D] and covariance [P, D, D] in float64, updated batch by batch."""

    def __init__(self, device: torch.device):
        self.device = device
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None  # sum of centred outer products

    def update(self, packets: torch.Tensor) -> None:
        """packets: [B, P, C, h, w] of B images."""
        batch = packets.to(self.device, torch.float64).flatten(2).transpose(0, 1)  # [P, B, D]
        count = batch.shape[1]
        mean = batch.mean(dim=1)
        centred = batch - mean[:, None, :]
        cross = centred.transpose(1, 2) @ centred
        if self.mean is None:
            self.count, self.mean, self.cross = count, mean, cross
            return
        total = self.count + count
        delta = mean - self.mean
        self.cross += cross + delta[:, :, None] * delta[:, None, :] * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Means [P, D] and unbiased covariances [P, D, D] as float64 numpy arrays."""
        if self.count < 2:
            raise ValueError(f"FWD needs at least 2 images per side, got {self.count}")
        return self.mean.cpu().numpy(), (self.cross / (self.count - 1)).cpu().numpy()


def packet_statistics(files: list[Path], transform: PacketTransform, device: torch.device, batch_size: int,
                      num_workers: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-packet means [P, D] and covariances [P, D, D] (float64) over the images in `files`."""
    stats = PacketStatistics(device)
    for batch in iterate_batches(files, transform, batch_size, num_workers, desc):
        stats.update(batch)
    return stats.result()


def fwd_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                        sqrtm: bool = False) -> float:
    """Mean over packets p of the Fréchet distance between N(mu1[p], sigma1[p]) and N(mu2[p], sigma2[p]): its trace
    term from symmetric eigendecompositions (`frechet_distance_psd`), or with `sqrtm` from scipy's sqrtm and the
    official imaginary-part check, as pytorchfwd (which raises when fewer images than a packet's dimensions make the
    product's square root complex)."""
    distance = frechet_distance if sqrtm else frechet_distance_psd
    distances = [distance(mu1[p], sigma1[p], mu2[p], sigma2[p])
                 for p in tqdm(range(len(mu1)), desc="FWD packets", unit="packet")]
    return float(np.mean(distances))


def check_one_size(files: list[Path]) -> tuple[int, int]:
    """The common (width, height) of `files` (read from headers); a file of another size is an error."""
    with Image.open(files[0]) as first:
        size = first.size
    for path in files[1:]:
        with Image.open(path) as image:
            if image.size != size:
                raise ValueError(f"image {path} is {image.size[0]}x{image.size[1]}, {files[0]} is "
                                 f"{size[0]}x{size[1]}: give --resize (FWD needs one image size)")
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("real_dir", type=Path, help="reference images (read recursively)")
    parser.add_argument("gen_dir", type=Path, help="generated images (read recursively)")
    parser.add_argument("--wavelet", default="haar", help="PyWavelets name (default haar)")
    parser.add_argument("--level", type=int, default=4, help="packet decomposition level (default 4)")
    parser.add_argument("--resize", type=int, help="resize every image to RESIZE x RESIZE (PIL bilinear); "
                        "default: no resize, all images must share one size")
    parser.add_argument("--log-scale", action="store_true",
                        help="use log(|c| + 1e-6) of the packet coefficients (pytorchfwd --log_scale)")
    parser.add_argument("--sqrtm", action="store_true", help="the trace term from scipy's sqrtm with the official "
                        "imaginary-part check (pytorchfwd; fails on rank-deficient covariances), not the symmetric "
                        "eigendecomposition")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=default_num_workers())
    parser.add_argument("--device", default=str(default_device()))


def run(args: argparse.Namespace) -> dict:
    real_files, gen_files = list_images(args.real_dir), list_images(args.gen_dir)
    if args.resize is None:
        check_one_size(real_files + gen_files)
    wavelet = pywt.Wavelet(args.wavelet).name
    transform = PacketTransform(wavelet, args.level, args.resize, args.log_scale)
    device = torch.device(args.device)
    batching = {"device": device, "batch_size": args.batch_size, "num_workers": args.num_workers}
    real_stats = packet_statistics(real_files, transform, desc="FWD real", **batching)
    gen_stats = packet_statistics(gen_files, transform, desc="FWD gen", **batching)
    return {
        "values": {"fwd": fwd_from_statistics(*real_stats, *gen_stats, sqrtm=args.sqrtm)},
        "n_images": {"real": len(real_files), "gen": len(gen_files)},
        "settings": {
            "wavelet": wavelet,
            "level": args.level,
            "boundary_mode": BOUNDARY_MODE,
            "log_scale": args.log_scale,
            "resize": args.resize,
            "resize_filter": "PIL bilinear" if args.resize is not None else None,
            "pixel_range": [0.0, 1.0],
            "dtype": "float64",
            "trace": "sqrtm" if args.sqrtm else "eigh",
            "packets": 4**args.level,
        },
        "inputs": {
            "real_dir": str(args.real_dir),
            "gen_dir": str(args.gen_dir),
            "real_files_sha256": file_list_hash(real_files, args.real_dir),
            "gen_files_sha256": file_list_hash(gen_files, args.gen_dir),
        },
        "weights_sha256": {},
    }
