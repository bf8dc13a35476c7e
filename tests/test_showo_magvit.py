"""Show-o with its own tokenizer, MAGVIT-v2, as at paper scale: `load_vq` finds it, the patch database, split tokens
and an O index are built on its tokens, and FAiD fine-tuning and generation take it through --tokenizer."""

import json

import numpy as np
import pytest
import torch
from showo_cli import generate_every_method
from transformers import JanusVQVAE

from arrag.cli import main
from arrag.models import magvit2
from arrag.models.showo import build_tiny_showo
from arrag.models.vq import codebook_vectors, decode_tokens, encode_images, is_magvit2
from arrag.patchdb.encode import load_vq, vq_geometry
from arrag.shapes.dataset import ShapesConfig, write_split
from arrag.split_tokens import encode_files
from arrag.training.finetune import finetune_pairs
from arrag.training.showo import load_showo_tokenizer
from arrag.training.vq import VQTrainConfig, vq_config

WORDS = "a the red green blue circle square star two of on dark background".split()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """16 x 16 Shapes splits, a random tiny MAGVIT-v2 (8 x 8 grid, 64 codes), a random tiny Show-o of that grid and
    codebook, database shards and an O index on MAGVIT-v2 tokens, MJHQ-style prompts."""
    root = tmp_path_factory.mktemp("showo_magvit")
    write_split(root / "train", "train", 8, ShapesConfig(image_size=16))
    write_split(root / "database", "database", 8, ShapesConfig(image_size=16))
    torch.manual_seed(0)
    magvit2.save_magvit2(magvit2.Magvit2(magvit2.tiny_magvit2_config(code_bits=6)), root / "magvit")
    build_tiny_showo(WORDS, codebook_size=64, grid_size=8, hidden_size=32, num_heads=2,
                     intermediate_size=64).save_pretrained(root / "showo")
    shards = []
    for shard in range(2):
        shards.append(str(root / f"shard{shard}.npz"))
        assert main(["encode-patches", "--images", str(root / "database"), "--vq", str(root / "magvit"),
                     "--image-size", "16", "--neighbourhood", "O", "--shard", str(shard), "--shards", "2",
                     "--out", shards[-1]]) == 0
    assert main(["build-index", "--type", "tokens", "--neighbourhood", "O", "--nlist", "4", "--out",
                 str(root / "index" / "index.tokens"), *shards]) == 0
    assert main(["tokenize", "--images", str(root / "train"), "--vq", str(root / "magvit"), "--size", "16",
                 "--device", "cpu", "--out", str(root / "tokens.npz")]) == 0
    meta = {f"p{i}": {"category": "shapes", "prompt": p} for i, p in
            enumerate(["a red circle", "two blue squares", "a green star on a dark background"])}
    (root / "meta_data.json").write_text(json.dumps(meta))
    return root


def test_load_vq_finds_magvit2_and_the_vq_functions_take_it(world):
    vq = load_vq(world / "magvit", image_size=16)
    assert is_magvit2(vq) and vq_geometry(vq) == (16, 8)
    assert vq_geometry(load_vq(world / "magvit", image_size=32)) == (32, 16)  # it is fully convolutional
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    tokens = encode_images(vq, images)
    assert torch.equal(tokens, magvit2.encode_images(vq, images)) and tokens.shape == (2, 8, 8)
    assert torch.equal(decode_tokens(vq, tokens), magvit2.decode_tokens(vq, tokens))
    # the codebook vectors keys and queries use are the raw +-1 LFQ vectors (the official O keys), also when asked
    # for normalised ones (normalising would divide squared distances by 6 here, 13 at paper scale)
    assert torch.equal(codebook_vectors(vq, normalized=True), magvit2.codebook_vectors(vq))
    assert torch.equal(codebook_vectors(vq, normalized=True).abs(), torch.ones(64, 6))
    with np.load(world / "index" / "index.tokens.values.npz") as values:
        assert np.array_equal(np.abs(values["codebook"]), np.ones((64, 6)))  # the O index is keyed on them
    # the LFQ vector of highest dot product with a normalised latent is the LFQ code (the signs)
    z = torch.nn.functional.normalize(magvit2.encode_latents(vq, images), dim=-1)
    scores = z.reshape(-1, 6) @ codebook_vectors(vq, normalized=True).T
    # the runner-up flips the sign of the smallest entry, 2 |z_i| lower: 5.4e-3 for these images, 5e-5 for others
    # (seeds 0-4); a 6-term float32 dot product of terms <= 1 is off by < 1e-6, so above 1e-5 no near-tie
    top = scores.topk(2, dim=-1).values
    assert (top[:, 0] - top[:, 1]).min() > 1e-5
    assert torch.equal(scores.argmax(-1).view(2, 8, 8), tokens)


def test_a_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"image tokenizer '{tmp_path}': neither a local folder"):
        load_vq(tmp_path)


def test_database_and_split_tokens_are_magvit2_tokens(world):
    vq = load_vq(world / "magvit", image_size=16)
    _, _, files = finetune_pairs(world / "train")
    with np.load(world / "tokens.npz") as stored:
        np.testing.assert_array_equal(stored["tokens"], encode_files(vq, files, 16).numpy())
    _, _, database_files = finetune_pairs(world / "database")
    stored = [np.load(world / f"shard{s}.npz") for s in range(2)]
    encoded = encode_files(vq, database_files, 16).view(-1, 8, 8).numpy()
    for shard in stored:  # each shard holds its images' tokens, by id
        rows = [[f.stem for f in database_files].index(i) for i in shard["image_ids"].tolist()]
        np.testing.assert_array_equal(shard["tokens"], encoded[rows])


def test_faid_finetune_and_generation_take_the_tokenizer(world, tmp_path):
    tokenizer = ["--tokenizer", str(world / "magvit")]
    index = str(world / "index" / "index.tokens")
    assert main(["finetune-showo-faid", "--backbone", str(world / "showo"), "--images", str(world / "train"),
                 "--tokens", str(world / "tokens.npz"), "--index", index, "--hops", "1", "--num-blenders", "1",
                 "--k", "3", "--out", str(tmp_path / "faid"), "--checkpoint", str(tmp_path / "faid_ckpt"),
                 "--epochs", "1", "--global-batch", "4", "--micro-batch", "2", "--lora-rank", "2", "--lora-alpha",
                 "4", "--device", "cpu", *tokenizer]) == 0
    generated = generate_every_method(world, tmp_path, index, tmp_path / "faid", *tokenizer)
    for _, files in generated.values():
        assert [p.name for p in files] == ["p0.png", "p1.png", "p2.png"]
    pngs = {method: [p.read_bytes() for p in files] for method, (_, files) in generated.items()}
    assert pngs["showo_daid"] != pngs["showo"]  # lambda 1: the final half decides retrieved tokens


def test_a_tokenizer_of_another_grid_is_refused(world, tmp_path):
    JanusVQVAE(vq_config(VQTrainConfig(image_size=16, grid=2, codebook_size=16, channel_multiplier=(1, 1, 1, 1),
                                       latent_channels=32))).save_pretrained(tmp_path / "vq")
    with pytest.raises(ValueError, match="makes 2-token grids, the backbone 8"):
        load_showo_tokenizer(world / "showo", 8, str(tmp_path / "vq"))
