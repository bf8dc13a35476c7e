"""CMMD: the MMD estimator against a direct numpy implementation, the CLI with a tiny open_clip
checkpoint (the way the Shapes CLIP is loaded), the official drop-remainder switch, preprocessing, cache
and batch-size invariance. No CLIP weights can be downloaded here: the model is a tiny random one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from evaluators import cmmd
from evaluators.__main__ import main
from evaluators.features import extract_features
from evaluators.io import list_images, sha256_file

CPU = torch.device("cpu")
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def write_images(folder: Path, n: int, seed: int, size: tuple[int, int] = (40, 32)) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 256, 3) + rng.normal(0, 30, (size[1], size[0], 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, Path]:
    """(config JSON, checkpoint) of a tiny random open_clip model, saved as the Shapes CLIP will be."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    config = folder / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    checkpoint = folder / "tiny-clip.pt"
    torch.save(open_clip.create_model("tiny-clip").state_dict(), checkpoint)
    return config, checkpoint


def direct_mmd(x: np.ndarray, y: np.ndarray, sigma: float, scale: float) -> float:
    def mean_kernel(a, b):
        sq_dist = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-sq_dist / (2 * sigma**2)).mean()

    return scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y))


@pytest.mark.parametrize("sigma", [10.0, 1.0])
def test_mmd_matches_direct_numpy(sigma, monkeypatch):
    monkeypatch.setattr(cmmd, "_ROW_BLOCK", 3)  # exercise the row blocking
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(0.3, 1.2, size=(9, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    expected = direct_mmd(x, y, sigma, 1000.0)
    # float64 on both sides; the expanded |a|^2 + |b|^2 - 2 a.b loses ~1e-16 of the squared distances (~1),
    # and the three means (~0.99) cancel to 0.04 (sigma 10): ~1e-14 relative, measured 6e-15
    assert cmmd.mmd(x, y, sigma=sigma, scale=1000.0) == pytest.approx(expected, rel=1e-10)
    assert cmmd.mmd(x.astype(np.float32), y, sigma=sigma) == pytest.approx(
        direct_mmd(x.astype(np.float32).astype(np.float64), y, sigma, 1000.0), rel=1e-10)
    assert cmmd.mmd(x, x) == pytest.approx(0.0, abs=1e-9)  # three equal float64 means: exactly 0 (measured)


def test_cli_with_checkpoint_cache_and_parity(tmp_path, tiny_clip, capsys):
    config, checkpoint = tiny_clip
    write_images(tmp_path / "real", 6, seed=1)
    write_images(tmp_path / "gen", 5, seed=2, size=(32, 48))
    argv = ["cmmd", str(tmp_path / "real"), str(tmp_path / "gen"), "--model-config", str(config),
            "--pretrained", str(checkpoint), "--num-workers", "0", "--device", "cpu", "--batch-size", "4",
            "--cache-dir", str(tmp_path / "cache"), "--json"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)

    clip = cmmd.load_clip(None, str(checkpoint), config)
    real = extract_features(list_images(tmp_path / "real"), clip.transform, clip.embed, CPU, 4, 0, "real")
    gen = extract_features(list_images(tmp_path / "gen"), clip.transform, clip.embed, CPU, 4, 0, "gen")
    np.testing.assert_allclose(np.linalg.norm(real, axis=1), 1.0, rtol=1e-5)  # float32 norm of 16: ~1e-7
    # The same model on the same batches as the CLI: identical float32 embeddings (measured equal at 1, 2, 4
    # threads and AVX2), so the float64 MMD agrees to rounding.
    assert record["cmmd"] == pytest.approx(cmmd.mmd(real, gen), rel=1e-9)
    assert record["cmmd"] > 0  # not a trivial 0 = 0: measured 0.34
    assert record["n_images"] == {"real": 6, "gen": 5}
    assert record["weights_sha256"]["clip"] == sha256_file(checkpoint)
    settings = record["settings"]
    assert (settings["model"], settings["image_size"], settings["sigma"], settings["scale"]) == \
        ("tiny-clip", 32, 10.0, 1000.0)
    assert settings["drop_remainder"] is False
    assert Path(record["inputs"]["real_cache"]).is_file()

    assert main(argv) == 0  # second run reads the cached reference embeddings
    again = json.loads(capsys.readouterr().out)
    # the cached float32 embeddings as stored, the generated ones recomputed on the same batches: identical
    assert again["cmmd"] == pytest.approx(record["cmmd"], rel=1e-12)

    assert main(argv[:2] + [argv[1]] + argv[3:]) == 0  # a folder against itself
    # identical embeddings (the same batches): the three means are equal, measured exactly 0
    assert json.loads(capsys.readouterr().out)["cmmd"] == pytest.approx(0.0, abs=1e-9)


def test_official_drop_remainder(tmp_path, tiny_clip, capsys):
    config, checkpoint = tiny_clip
    write_images(tmp_path / "real", 5, seed=3)
    write_images(tmp_path / "gen", 7, seed=4)
    assert main(["cmmd", str(tmp_path / "real"), str(tmp_path / "gen"), "--model-config", str(config),
                 "--pretrained", str(checkpoint), "--num-workers", "0", "--device", "cpu", "--batch-size", "2",
                 "--no-cache", "--official-drop-remainder"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["n_images"] == {"real": 4, "gen": 6}
    assert record["settings"]["drop_remainder"] is True


def test_centre_crop_then_resize():
    """Columns outside the centre square are cropped away before the resize."""
    pixels = np.full((32, 48, 3), 128, dtype=np.uint8)
    pixels[:, :8] = pixels[:, -8:] = (255, 0, 0)
    transform = cmmd.ClipTransform(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    out = transform(Image.fromarray(pixels))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), 128 / 255, atol=1e-7)  # float32 128 / 255: within 3e-8


def test_embeddings_invariant_to_batch_size(tmp_path, tiny_clip):
    config, checkpoint = tiny_clip
    write_images(tmp_path / "images", 5, seed=5)
    files = list_images(tmp_path / "images")
    clip = cmmd.load_clip(None, str(checkpoint), config)
    one = extract_features(files, clip.transform, clip.embed, CPU, 1, 0, "batch 1")
    five = extract_features(files, clip.transform, clip.embed, CPU, 5, 0, "batch 5")
    # Unit float32 embeddings (components ~0.25) from a one-layer width-32 transformer: other batch sizes sum
    # in other orders, measured up to 1.2e-7 (1, 2, 4 threads, AVX2), under a tenth of this tolerance.
    np.testing.assert_allclose(one, five, rtol=1e-5, atol=1e-6)


def test_custom_model_needs_weights(tiny_clip):
    with pytest.raises(ValueError, match="--pretrained"):
        cmmd.load_clip(None, None, tiny_clip[0])
