"""Shapes VQ training: the loss falls, and a killed run resumed from its checkpoint ends with the same weights."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import JanusVQVAE

import arrag.training.vq as vq_training
from arrag.shapes.dataset import ShapesConfig, read_annotations, write_split
from arrag.shapes.vocab import vocabulary
from arrag.training.vq import VQTrainConfig, reconstruct_split, train_vq, vq_config

TINY = VQTrainConfig(image_size=16, grid=4, codebook_size=16, base_channels=32, channel_multiplier=(1, 1, 1),
                     latent_channels=32, steps=8, batch_size=4, lr=2e-3, restart_every=4, checkpoint_every=3)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vq") / "db"
    write_split(folder, "database", 24, ShapesConfig(image_size=16))
    return folder


def test_training_saves_a_loadable_model_and_the_loss_falls(images, tmp_path):
    config = VQTrainConfig(**{**TINY.__dict__, "steps": 20})
    metrics = train_vq(images, tmp_path / "vq", tmp_path / "vq.pt", config, heldout_dir=images)
    rows = (tmp_path / "vq" / "loss.csv").read_text().splitlines()
    assert len(rows) == 21
    losses = [float(r.split(",")[1]) for r in rows[1:]]
    assert sum(losses[-4:]) < sum(losses[:4])
    assert (tmp_path / "vq" / "loss.png").is_file() and (tmp_path / "vq" / "reconstructions.png").is_file()
    loaded = JanusVQVAE.from_pretrained(tmp_path / "vq")
    assert loaded.config.num_embeddings == 16
    assert metrics["heldout_psnr"] > 5


def test_resume_after_a_kill_gives_the_same_weights(images, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train_vq(images, straight, tmp_path / "straight.pt", TINY)

    real_step, calls = vq_training.train_step, []

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # killed during step 4, after the checkpoint of step 3
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(vq_training, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_vq(images, tmp_path / "resumed", tmp_path / "resumed.pt", TINY)
    monkeypatch.setattr(vq_training, "train_step", real_step)
    assert torch.load(tmp_path / "resumed.pt", weights_only=True)["step"] == 3
    train_vq(images, tmp_path / "resumed", tmp_path / "resumed.pt", TINY)

    a = JanusVQVAE.from_pretrained(straight).state_dict()
    b = JanusVQVAE.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "loss.csv").read_text() == (tmp_path / "resumed" / "loss.csv").read_text()


def test_checkpoint_of_another_config_is_refused(images, tmp_path):
    train_vq(images, tmp_path / "a", tmp_path / "a.pt", TINY)
    with pytest.raises(ValueError, match="another config"):
        train_vq(images, tmp_path / "b", tmp_path / "a.pt", VQTrainConfig(**{**TINY.__dict__, "lr": 1e-3}))


def test_reconstructions_of_a_split_keep_ids_and_size(images, tmp_path):
    train_vq(images, tmp_path / "vq", tmp_path / "vq.pt", VQTrainConfig(**{**TINY.__dict__, "steps": 2}))
    assert reconstruct_split(tmp_path / "vq", images, tmp_path / "recon", limit=5) == 5
    ids = [r["id"] for r in read_annotations(images)][:5]
    assert sorted(p.stem for p in (tmp_path / "recon").iterdir()) == sorted(ids)
    assert Image.open(tmp_path / "recon" / f"{ids[0]}.png").size == (16, 16)


def test_uniform_object_weights_give_the_unweighted_loss_and_masks_move_it(images):
    torch.manual_seed(0)
    vq = JanusVQVAE(vq_training.vq_config(TINY))
    x = vq_training.to_model_input(vq_training.read_images(images, limit=4))
    objects = vq_training.read_object_masks(images, limit=4)
    plain, _, _ = vq_training.train_step(vq, x, 0.25, "fp32")
    uniform, _, _ = vq_training.train_step(vq, x, 0.25, "fp32", torch.full(objects.shape, 3.0))
    weighted, _, _ = vq_training.train_step(vq, x, 0.25, "fp32", 1.0 + 9.0 * objects.float())
    # the same float32 terms summed in another order: agreement to ~1e-6 relative
    assert uniform.item() == pytest.approx(plain.item(), rel=1e-5)
    assert 0 < objects.float().mean() < 0.5 and abs(weighted.item() - plain.item()) > 1e-3


def test_heldout_checks_score_the_reconstructions_against_the_annotations(tmp_path, monkeypatch):
    images = tmp_path / "heldout"  # 64 px: the detector's size (its smallest shape is 8 px wide)
    write_split(images, "heldout", 6, ShapesConfig(image_size=64))
    torch.manual_seed(0)
    vq = JanusVQVAE(vq_training.vq_config(TINY)).eval()
    monkeypatch.setattr(vq_training, "reconstruct", lambda model, x: x)  # a lossless tokenizer
    checks = vq_training.heldout_checks(vq, images, limit=6)
    # clean renders: the detector finds every object with its colour (tests/test_shapes_detector.py)
    assert checks["heldout_detector"]["recall"] == 1.0 and checks["heldout_detector"]["color_accuracy"] == 1.0
    assert checks["heldout_images"] == 6
    # background-only PSNR by hand: every pixel painted with the annotated background colour
    record = read_annotations(images)[0]
    pixels = np.asarray(Image.open(images / "images" / f"{record['id']}.png").convert("RGB"), dtype=np.float64)
    fill = np.array(vocabulary()["backgrounds"][record["background"]], dtype=np.float64)
    first = 10 * np.log10(255.0**2 / np.mean((pixels - fill) ** 2))
    one = vq_training.heldout_checks(vq, images, limit=1)
    assert one["background_psnr"] == pytest.approx(first, abs=1e-3)  # float32 of values in [-1, 1]: ~1e-5 dB


def test_the_cli_fails_below_the_configured_psnr_floor(images, tmp_path, capsys):
    from arrag.cli import main

    common = ["train-vq", "--images", str(images), "--heldout", str(images), "--image-size", "16", "--steps", "2",
              "--batch-size", "4", "--codebook-size", "16"]
    assert main([*common, "--out", str(tmp_path / "a"), "--checkpoint", str(tmp_path / "a.pt")]) == 0
    reached = float(capsys.readouterr().out.split("held-out PSNR ")[1].split(" dB")[0])
    assert main([*common, "--out", str(tmp_path / "b"), "--checkpoint", str(tmp_path / "b.pt"),
                 "--min-heldout-psnr", str(reached - 0.5)]) == 0
    assert main([*common, "--out", str(tmp_path / "c"), "--checkpoint", str(tmp_path / "c.pt"),
                 "--min-heldout-psnr", str(reached + 0.5)]) == 2
    assert "shapes_models.vq.min_heldout_psnr" in capsys.readouterr().err


def test_the_cli_fails_below_the_detector_floors(images, tmp_path, capsys):
    from arrag.cli import main

    common = ["train-vq", "--images", str(images), "--heldout", str(images), "--image-size", "16", "--steps", "2",
              "--batch-size", "4", "--codebook-size", "16"]
    assert main([*common, "--out", str(tmp_path / "a"), "--checkpoint", str(tmp_path / "a.pt")]) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    recall = metrics["heldout_detector"]["recall"]
    assert recall < 1.0  # two steps of a 16-code VQ lose objects
    assert main([*common, "--out", str(tmp_path / "b"), "--checkpoint", str(tmp_path / "b.pt"),
                 "--min-detector-recall", str(min(1.0, recall + 0.01))]) == 2
    assert "shapes_models.vq.min_detector_recall" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="measured on --heldout"):
        main(["train-vq", "--images", str(images), "--out", str(tmp_path / "c"), "--checkpoint",
              str(tmp_path / "c.pt"), "--min-color-accuracy", "0.5"])


def test_a_vq_without_res_blocks_needs_one_width_for_every_level():
    """JanusVQVAE changes the channel width inside a res block: with none, changing multipliers cannot build."""
    vq_config(replace(TINY, num_res_blocks=0, channel_multiplier=(1, 1, 1)))  # one width: builds
    with pytest.raises(ValueError, match="num_res_blocks 0"):
        vq_config(replace(TINY, num_res_blocks=0, channel_multiplier=(1, 2, 2)))
