"""FID: Fréchet distance closed forms, clean-fid parity, self-distance, per-category, cache, batch size.

The pipeline tests use a tiny TorchScript extractor with the Inception file's `layers` layout (a 2048-d
sqrtm takes tens of seconds on two cores); the real Inception is checked for batch-size invariance.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from evaluators import fid
from evaluators.__main__ import main
from evaluators.features import cached_features, extract_features
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
    # All in float64 on well-conditioned matrices: sqrtm agrees with the closed forms to ~1e-15 relative
    # (measured); the tolerances below leave margins of 1000 and more.
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
    # S1 S2 has rank 29 of 64: sqrtm returns the roots of its 35 rounding-level eigenvalues, each up to
    # sqrt(eps |S1 S2|) = 6e-6, so the two agree to 2 x 35 x 6e-6 = 1e-6 of this FID (430); measured 2e-7 with
    # OpenBLAS's Haswell, SkylakeX, Sandybridge and Prescott kernels and 1, 2, 4 threads.
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 64)).astype(np.float32) @ rng.normal(size=(64, 64)).astype(np.float32)
    gen = (real[:30] + rng.normal(0, 0.5, (30, 64))).astype(np.float32) + 0.3
    official = fid.frechet_distance(real.mean(0), np.cov(real, rowvar=False), gen.mean(0), np.cov(gen, rowvar=False))
    assert official > 1  # measured 430
    assert fid.fid_from_features(real, gen) == pytest.approx(official, rel=1e-6)
    assert fid.fid_from_features(real, gen, sqrtm=True) == official  # the same calls on the same arrays
    # |A|_F^2 twice minus the singular values of A A^T (their sum is |A|_F^2): float64 rounding of traces ~4e3,
    # ~1e-12 (measured 0)
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
    assert record["fid"] > 1e-3  # not a trivial 0 = 0: measured 0.082
    # The same extractor on the same batches of the same float32 inputs: identical features, and both take
    # the float64 statistics and sqrtm the same way (measured equal at 1, 2, 4 threads and AVX2). 1e-9 allows
    # float64 rounding only: rounding the resized pixels to integers, as a uint8 resize would, moves it by 4e-6.
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
    # identical features (the same batches): what is left is sqrtm's float64 rounding, measured ~1e-12
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
    assert again["fid"] > 1e-3  # other images: measured 0.15


def _features_counting_computations(cache_dir: str, counter: str) -> list:
    """cached_features of one key whose computation appends to `counter` and takes 0.5 s (a child process)."""
    def compute() -> np.ndarray:
        with open(counter, "a") as out:
            out.write("computed\n")
        time.sleep(0.5)
        return np.arange(6, dtype=np.float32).reshape(2, 3)

    features, _ = cached_features(Path(cache_dir), {"metric": "fid", "files": "abc"}, ["a.png", "b.png"], compute)
    return features.tolist()


def test_jobs_that_start_together_compute_the_reference_features_once(tmp_path):
    """Two processes asking for the same entry at once: one computes it, the other waits and reads it."""
    counter = tmp_path / "computations.txt"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_features_counting_computations, [(str(tmp_path / "cache"), str(counter))] * 2)
    assert results[0] == results[1] == [[0, 1, 2], [3, 4, 5]]
    assert counter.read_text() == "computed\n"  # without the lock: twice (both find no entry within the 0.5 s)


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
    # float32 features (0 to 4) through about 90 layers; another summation order (contiguous layout instead of
    # channels-last, oneDNN off, or float64) moves them by at most 5e-6, under a tenth of this tolerance.
    # Measured equal across batch sizes at 1, 2, 4 threads and AVX2.
    np.testing.assert_allclose(one, three, rtol=1e-4, atol=1e-5)


def test_symmetric_trace_equals_sqrtm_where_it_succeeds_and_is_finite_where_it_fails():
    rng = np.random.default_rng(11)
    full = [rng.normal(size=(200, 6)) for _ in range(2)]  # 200 samples of 6 dims: well-conditioned covariances
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in full]
    # both float64, the same quantity by two factorisations: agreement to ~1e-13 (measured), 1e-9 leaves margin
    assert fid.frechet_distance_psd(*stats[0], *stats[1]) == pytest.approx(
        fid.frechet_distance(*stats[0], *stats[1]), rel=1e-9)
    # 16 samples of 48 dims (a 64 px Shapes image's level-4 Haar packet): rank-15 covariances. The reference
    # Tr((S1 S2)^(1/2)) is the nuclear norm of B A^T (S1 = A^T A, S2 = B^T B), as in fid_from_features.
    few = [rng.normal(size=(16, 48)) @ rng.normal(size=(48, 48)) for _ in range(2)]
    a, b = (fid.scaled_deviations(x) for x in few)
    diff = few[0].mean(0) - few[1].mean(0)
    expected = diff @ diff + np.sum(a * a) + np.sum(b * b) - 2 * np.linalg.svd(b @ a.T, compute_uv=False).sum()
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in few]
    # 33 null directions whose rounding-level eigenvalues (~eps * 1e3) enter through a square root: ~1e-6 each
    # absolute, measured 4e-5 in all (1.4e-8 relative); 1e-6 relative leaves a margin (as the low-rank FID test)
    assert fid.frechet_distance_psd(*stats[0], *stats[1]) == pytest.approx(expected, rel=1e-6)


def test_symmetric_trace_where_the_official_sqrtm_fails():
    """Packet 0 of a CI run's FWD (16 references against 16 DAiD images, 48-d Haar packets, rank-15 covariances),
    on which pytorchfwd's check raises: the symmetric computation is finite and, computed with the roles of the
    two covariances swapped (Tr((S1 S2)^(1/2)) = Tr((S2 S1)^(1/2))), gives the same value."""
    packet = np.load(Path(__file__).parent / "data" / "fwd_rank_deficient_packet.npz")
    mu1, s1, mu2, s2 = (packet[name] for name in ("mu1", "s1", "mu2", "s2"))
    with pytest.raises(ValueError, match="imaginary component"):
        fid.frechet_distance(mu1, s1, mu2, s2)
    value = fid.frechet_distance_psd(mu1, s1, mu2, s2)
    # the square roots of rounding-level eigenvalues (~1e-6 each, above) differ between the two orders
    assert np.isfinite(value) and value == pytest.approx(fid.frechet_distance_psd(mu2, s2, mu1, s1), rel=1e-6)
