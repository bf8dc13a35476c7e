"""Split tokens (`arrag tokenize`): the file holds what encoding gives, readers get their rows by file name,
training from the file equals training that encodes, and tokens of another VQ or size are refused."""

import numpy as np
import pytest
import torch
from transformers import JanusVQVAE

from arrag.cli import main
from arrag.models.janus import load_backbone
from arrag.shapes.dataset import ShapesConfig, write_split
from arrag.split_tokens import encode_files, image_tokens, vq_fingerprint
from arrag.training.finetune import finetune_pairs
from arrag.training.lm import LMTrainConfig, train_lm
from arrag.training.vq import VQTrainConfig, vq_config

TINY_VQ = VQTrainConfig(image_size=16, grid=2, codebook_size=16, channel_multiplier=(1, 1, 1, 1), latent_channels=32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("split_tokens")
    write_split(root / "train", "train", 12, ShapesConfig(image_size=16))
    torch.manual_seed(0)
    JanusVQVAE(vq_config(TINY_VQ)).save_pretrained(root / "vq")
    assert main(["tokenize", "--images", str(root / "train"), "--vq", str(root / "vq"), "--device", "cpu",
                 "--out", str(root / "tokens.npz")]) == 0
    return root


def test_file_holds_the_encoded_tokens_and_rows_follow_the_files(data):
    vq = JanusVQVAE.from_pretrained(data / "vq").eval()
    _, _, files = finetune_pairs(data / "train")
    encoded = encode_files(vq, files, 16)  # the same batches as `arrag tokenize`: the same computation
    assert encoded.shape == (12, 4) and encoded.dtype == torch.long
    with np.load(data / "tokens.npz") as stored:
        assert stored["names"].tolist() == [f.name for f in files]
        np.testing.assert_array_equal(stored["tokens"], encoded.numpy())
    picked = [files[7], files[2], files[7]]
    assert torch.equal(image_tokens(vq, picked, 16, data / "tokens.npz"), encoded[[7, 2, 7]])


def test_other_vq_size_or_images_are_refused(data, tmp_path):
    vq = JanusVQVAE.from_pretrained(data / "vq").eval()
    _, _, files = finetune_pairs(data / "train")
    other = JanusVQVAE.from_pretrained(data / "vq").eval()
    with torch.no_grad():
        other.quantize.embedding.weight[0, 0] += 1e-3
    assert vq_fingerprint(other) != vq_fingerprint(vq)
    with pytest.raises(ValueError, match="another VQ"):
        image_tokens(other, files, 16, data / "tokens.npz")
    with pytest.raises(ValueError, match="16px images, this job needs 32px"):
        image_tokens(vq, files, 32, data / "tokens.npz")
    with pytest.raises(ValueError, match=r"no tokens for 1 images \(\['elsewhere.png'\]"):
        image_tokens(vq, [files[0], tmp_path / "elsewhere.png"], 16, data / "tokens.npz")


def test_lm_trained_from_the_file_equals_lm_that_encodes(data, tmp_path):
    config = LMTrainConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, steps=4, batch_size=4,
                           warmup_steps=1)
    train_lm(data / "train", data / "vq", tmp_path / "encoded", tmp_path / "a.pt", config)
    train_lm(data / "train", data / "vq", tmp_path / "from_file", tmp_path / "b.pt", config, data / "tokens.npz")
    a = load_backbone(str(tmp_path / "encoded"))
    b = load_backbone(str(tmp_path / "from_file"))
    # encoding in train_lm batches the files as `arrag tokenize` did, so the tokens are identical and so is training
    assert all(torch.equal(a.model.state_dict()[k], v) for k, v in b.model.state_dict().items())
    # The backbone's VQ is the trained VQ: one tokens file serves the LM and every backbone fine-tune.
    assert vq_fingerprint(b.vq) == vq_fingerprint(JanusVQVAE.from_pretrained(data / "vq"))
