"""FWD: parity with pytorchfwd 1.0.1 (when importable), a hand-derived Haar case, batch-size invariance,
the resize policy and errors naming files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluators import fwd
from evaluators.__main__ import main
from evaluators.fid import frechet_distance
from evaluators.io import list_images

CPU = torch.device("cpu")


def write_images(folder: Path, n: int, seed: int, size: tuple[int, int] = (32, 32)) -> None:
    """n PNGs: a shared random pattern per folder plus per-image noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 256, (size[1], size[0], 3))
    for i in range(n):
        pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def run_fwd(real: Path, gen: Path, capsys, *options: str) -> dict:
    assert main(["fwd", str(real), str(gen), "--num-workers", "0", "--device", "cpu", "--batch-size", "5",
                 *options]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("wavelet", "level", "resize", "sizes"),
    [("Haar", 4, None, [(32, 32), (32, 32)]), ("db2", 2, 12, [(20, 18), (18, 22)])],
)
def test_parity_with_pytorchfwd(tmp_path, capsys, wavelet, level, resize, sizes):
    previous = torch.get_default_dtype()
    try:
        pytorchfwd = pytest.importorskip("pytorchfwd.fwd")  # its import sets the default dtype to float64
        pytorchfwd.NUM_PROCESSES = 0
        torch.set_default_dtype(torch.float64)  # pytorchfwd's ToTensor relies on it
        write_images(tmp_path / "real", 16, seed=0, size=sizes[0])
        write_images(tmp_path / "gen", 16, seed=1, size=sizes[1])
        expected = pytorchfwd.compute_fwd([str(tmp_path / "real"), str(tmp_path / "gen")], wavelet, level,
                                          False, 5, resize)
    finally:
        torch.set_default_dtype(previous)
    capsys.readouterr()  # pytorchfwd prints its progress to stdout
    options = ["--wavelet", wavelet, "--level", str(level)] + (["--resize", str(resize)] if resize else [])
    record = run_fwd(tmp_path / "real", tmp_path / "gen", capsys, *options)
    assert record["fwd"] > 0  # not a trivial 0 = 0: measured 1.9 (Haar) and 2.2 (db2)
    # Both in float64. The db2 packets (75-d, 16 images) have singular covariances, whose rounding-level
    # eigenvalues sqrtm turns into roots of up to sqrt(eps |S1 S2|): at most 3e-8 of this FWD (measured 2e-11;
    # Haar, full rank: 1e-15). 1e-6 leaves a margin; a wrong wavelet, boundary mode or resize moves it by far more.
    assert abs(record["fwd"] - expected) <= 1e-6 * abs(expected)
    assert record["settings"]["resize"] == resize and record["settings"]["packets"] == 4**level


def test_hand_derived_haar_level_one(tmp_path, capsys):
    """2x2 images, Haar level 1: each packet holds one coefficient per channel,
    a = (p00 + p01 + p10 + p11) / 2, h = (p00 + p01 - p10 - p11) / 2, v = (p00 - p01 + p10 - p11) / 2,
    d = (p00 - p01 - p10 + p11) / 2 (signs do not change a Fréchet distance); FWD = mean over the 4."""
    rng = np.random.default_rng(2)
    sets = {name: rng.integers(0, 256, (12, 2, 2, 3)).astype(np.uint8) for name in ("real", "gen")}
    packets = {}
    for name, images in sets.items():
        (tmp_path / name).mkdir()
        for i, pixels in enumerate(images):
            Image.fromarray(pixels).save(tmp_path / name / f"{i:02d}.png")
        p = images.astype(np.float64) / 255  # [N, row, col, channel]
        p00, p01, p10, p11 = p[:, 0, 0], p[:, 0, 1], p[:, 1, 0], p[:, 1, 1]
        packets[name] = [(p00 + p01 + p10 + p11) / 2, (p00 + p01 - p10 - p11) / 2,
                         (p00 - p01 + p10 - p11) / 2, (p00 - p01 - p10 + p11) / 2]  # each [N, 3]
    expected = np.mean([
        frechet_distance(r.mean(0), np.cov(r, rowvar=False), g.mean(0), np.cov(g, rowvar=False))
        for r, g in zip(packets["real"], packets["gen"], strict=True)
    ])
    record = run_fwd(tmp_path / "real", tmp_path / "gen", capsys, "--level", "1")
    # float64 on both sides, full-rank 3 x 3 covariances: equal to ~1e-15 relative (measured)
    assert record["fwd"] == pytest.approx(expected, rel=1e-9)


def test_statistics_invariant_to_batch_size(tmp_path):
    write_images(tmp_path / "images", 11, seed=3, size=(16, 16))
    files = list_images(tmp_path / "images")
    transform = fwd.PacketTransform("haar", 2)
    stats = {b: fwd.packet_statistics(files, transform, CPU, b, 0, f"batch {b}") for b in (1, 4, 11)}
    # float64 moments merged batch by batch vs one batch: rounding of ~1e-16 relative per operation; the
    # measured differences are under 1% of this tolerance
    for batch_size in (1, 4):
        for ours, reference in zip(stats[batch_size], stats[11], strict=True):
            np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-14)
    mean, cov = stats[11]
    assert mean.shape == (16, 3 * 4 * 4) and cov.shape == (16, 48, 48) and cov.dtype == np.float64


def test_sizes_must_agree_without_resize(tmp_path, capsys):
    write_images(tmp_path / "real", 3, seed=4, size=(32, 32))
    write_images(tmp_path / "gen", 3, seed=5, size=(32, 32))
    write_images(tmp_path / "gen" / "sub", 1, seed=6, size=(24, 32))
    with pytest.raises(ValueError, match="sub/000.png is 24x32"):
        run_fwd(tmp_path / "real", tmp_path / "gen", capsys)
    record = run_fwd(tmp_path / "real", tmp_path / "gen", capsys, "--resize", "16", "--level", "2")
    assert record["n_images"] == {"real": 3, "gen": 4} and record["settings"]["resize_filter"] == "PIL bilinear"


def test_undecodable_image_is_named(tmp_path, capsys):
    write_images(tmp_path / "real", 3, seed=7)
    (tmp_path / "real" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match="broken.jpg"):
        run_fwd(tmp_path / "real", tmp_path / "real", capsys, "--resize", "32")
