"""FID: Fréchet distance closed forms, clean-fid parity, self-distance, per-category, cache, batch size.

The pipeline tests use a tiny TorchScript extractor with the Inception file's `layers` layout (a 2048-d
sqrtm takes tens of seconds on two cores); the real Inception is checked for batch-size invariance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from evaluators import fid
from evaluators.__main__ import main
from evaluators.features import extract_features
from evaluators.io import list_images

CPU = torch.device("cpu")


def write_images(folder: Path, n: int, seed: int, size: tuple[int, int] = (32, 32)) -> None:
    """n PNGs, each a random flat colour plus noise (so pooled features vary between images)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 256, 3) + rng.normal(0, 30, (size[1], size[0], 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


class TinyInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 7, stride=8), torch.nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture(scope="module")
def tiny_inception(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny-inception.pt"
    torch.jit.script(TinyInception()).save(str(path))
    return path


def run_cli(argv: list[str], capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert fid.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == \
        pytest.approx(5.0, rel=1e-12)
    rng = np.random.default_rng(0)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2, a, b = rng.normal(size=5), rng.normal(size=5), rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # general: Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), square roots by eigendecomposition
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)

    def psd_sqrt(matrix):
        values, vectors = linalg.eigh(matrix)
        return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T

    root1 = psd_sqrt(s1)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(s1 + s2 - 2 * psd_sqrt(root1 @ s2 @ root1))
    assert fid.frechet_distance(mu_a, s1, mu_b, s2) == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(mu_a, s1, mu_a, s1) == pytest.approx(0.0, abs=1e-9)


def test_low_rank_trace_matches_sqrtm():
    # n1 * n2 <= D^2: the nuclear norm of B A^T stands in for Tr(sqrtm(S1 S2)); same number as clean-fid's sqrtm.
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 64)).astype(np.float32) @ rng.normal(size=(64, 64)).astype(np.float32)
    gen = (real[:30] + rng.normal(0, 0.5, (30, 64))).astype(np.float32) + 0.3
    official = fid.frechet_distance(real.mean(0), np.cov(real, rowvar=False), gen.mean(0), np.cov(gen, rowvar=False))
    assert official > 1
    assert fid.fid_from_features(real, gen) == pytest.approx(official, rel=1e-6)
    assert fid.fid_from_features(real, gen, sqrtm=True) == official
    assert fid.fid_from_features(real, real) == pytest.approx(0.0, abs=1e-6)


def test_matches_cleanfid_on_same_extractor(tmp_path, tiny_inception, capsys):
    cleanfid = pytest.importorskip("cleanfid.fid")
    write_images(tmp_path / "real", 10, seed=1)
    write_images(tmp_path / "gen", 9, seed=2, size=(48, 40))
    record = run_cli(["fid", str(tmp_path / "real"), str(tmp_path / "gen"), "--inception", str(tiny_inception),
                      "--num-workers", "0", "--device", "cpu", "--batch-size", "4", "--no-cache", "--sqrtm", "--json"],
                     capsys)
    reference = cleanfid.compute_fid(
        str(tmp_path / "real"), str(tmp_path / "gen"), mode="clean",
        custom_feat_extractor=fid.load_inception(tiny_inception, CPU),
        num_workers=0, batch_size=4, device=CPU, verbose=False,
    )
    assert record["fid"] > 1e-3
    assert abs(record["fid"] - reference) <= 1e-9 * abs(reference)
    assert record["n_images"] == {"real": 10, "gen": 9}
    assert "per_category" not in record and record["settings"]["mode"] == "clean"


def test_folder_against_itself_per_category_and_cache(tmp_path, tiny_inception, capsys):
    real = tmp_path / "mjhq"
    write_images(real / "animals", 6, seed=3)
    write_images(real / "people", 6, seed=4)
    argv = ["fid", str(real), str(real), "--inception", str(tiny_inception), "--num-workers", "0",
            "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "fid.json"),
            "--json"]
    record = run_cli(argv, capsys)
    assert record == json.loads((tmp_path / "fid.json").read_text())
    assert abs(record["fid"]) < 1e-6
    assert set(record["per_category"]) == {"animals", "people"}
    assert all(abs(value) < 1e-6 for value in record["per_category"].values())
    assert record["per_category_n_images"]["people"] == {"real": 6, "gen": 6}
    cache_file = Path(record["inputs"]["real_cache"])
    assert cache_file.is_file() and cache_file.parent == tmp_path / "cache"
    assert record["weights_sha256"]["inception"] and record["inputs"]["real_files_sha256"]

    # Cached reference features are used again, and a gen folder without the categories gets no split.
    write_images(tmp_path / "flat", 5, seed=5)
    argv[2] = str(tmp_path / "flat")
    again = run_cli(argv, capsys)
    assert again["inputs"]["real_cache"] == str(cache_file) and "per_category" not in again
    assert again["fid"] > 1e-3


def test_undecodable_image_is_named(tmp_path, tiny_inception):
    write_images(tmp_path / "real", 3, seed=6)
    (tmp_path / "real" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        main(["fid", str(tmp_path / "real"), str(tmp_path / "real"), "--inception", str(tiny_inception),
              "--num-workers", "0", "--device", "cpu", "--no-cache"])


def test_inception_features_invariant_to_batch_size(tmp_path):
    write_images(tmp_path / "images", 3, seed=7)
    files = list_images(tmp_path / "images")
    model = fid.load_inception(fid.find_inception(), CPU)
    one = extract_features(files, fid.clean_transform, model, CPU, 1, 0, "batch 1")
    three = extract_features(files, fid.clean_transform, model, CPU, 3, 0, "batch 3")
    assert one.shape == (3, 2048) and one.dtype == np.float32
    np.testing.assert_allclose(one, three, rtol=1e-4, atol=1e-5)
