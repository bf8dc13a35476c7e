"""The Show-o chain through the CLI, as the workflow runs it: train-showo -> encode-patches + build-index (O keys
redefined from L-encoded shards) -> finetune-showo-faid -> generate with showo, showo_daid and showo_faid."""

import json

import pytest
import torch
from showo_cli import generate_every_method
from transformers import JanusVQVAE

from arrag.cli import main
from arrag.shapes.dataset import ShapesConfig, write_split
from arrag.training.vq import VQTrainConfig, vq_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Train / database splits of 16 x 16 Shapes images, a random VQ (4 x 4 grid, 16 codes), a trained tiny
    Show-o, an O index over the database, MJHQ-style prompts."""
    root = tmp_path_factory.mktemp("showo_chain")
    write_split(root / "train", "train", 12, ShapesConfig(image_size=16))
    write_split(root / "database", "database", 12, ShapesConfig(image_size=16))
    torch.manual_seed(0)
    vq = JanusVQVAE(vq_config(VQTrainConfig(image_size=16, grid=4, codebook_size=16, channel_multiplier=(1, 1, 1),
                                            latent_channels=32)))
    vq.save_pretrained(root / "vq")
    tiny = ["--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--intermediate-size", "64"]
    assert main(["train-showo", "--images", str(root / "train"), "--vq", str(root / "vq"), "--out",
                 str(root / "showo"), "--checkpoint", str(root / "showo.pt"), "--steps", "6", "--batch-size", "4",
                 "--maskgit-steps", "2", *tiny]) == 0
    shards = []
    for shard in range(2):
        shards.append(str(root / f"shard{shard}.npz"))
        assert main(["encode-patches", "--images", str(root / "database"), "--vq", str(root / "vq"), "--shard",
                     str(shard), "--shards", "2", "--out", shards[-1]]) == 0  # L keys, as the main index
    assert main(["build-index", "--type", "tokens", "--neighbourhood", "O", "--nlist", "4", "--out",
                 str(root / "index_o" / "index.tokens"), *shards]) == 0
    meta = {f"p{i}": {"category": "shapes", "prompt": p} for i, p in
            enumerate(["a red circle", "two blue squares", "a green star on a dark background"])}
    (root / "meta_data.json").write_text(json.dumps(meta))
    return root


def test_faid_finetune_and_every_method_generates(world, tmp_path):
    assert main(["finetune-showo-faid", "--backbone", str(world / "showo"), "--images", str(world / "train"),
                 "--index", str(world / "index_o" / "index.tokens"), "--hops", "1", "--num-blenders", "2",
                 "--k", "3", "--max-images", "4", "--noise-draws", "2", "--out", str(tmp_path / "faid"), "--checkpoint",
                 str(tmp_path / "faid_ckpt"), "--epochs", "1", "--global-batch", "4", "--micro-batch", "2",
                 "--lora-rank", "2", "--lora-alpha", "4", "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "faid" / "metrics.json").read_text())
    assert metrics["images"] == 4 and metrics["examples"] == 8 and metrics["optimizer_steps"] == 2
    assert 0 < metrics["masked_fraction"] <= 1
    generated = generate_every_method(world, tmp_path, str(world / "index_o" / "index.tokens"), tmp_path / "faid")
    for record, files in generated.values():
        assert record["images_generated"] == 3 and [p.name for p in files] == ["p0.png", "p1.png", "p2.png"]
    assert generated["showo_faid"][0]["method_settings"]["weights"] == str(tmp_path / "faid")
    daid = generated["showo_daid"][0]["method_settings"]  # the record says what was retrieved, with which nprobe
    assert daid["retrieval"] == "patches" and daid["k"] == 4 and daid["nprobe"] == 4  # default 8, of 4 lists
    pngs = {method: [p.read_bytes() for p in files] for method, (_, files) in generated.items()}
    assert pngs["showo_daid"] != pngs["showo"]  # lambda 1: the final half decides retrieved tokens


def test_generation_refuses_an_l_index(world, tmp_path):
    shards = [str(world / f"shard{i}.npz") for i in range(2)]
    assert main(["build-index", "--type", "tokens", "--nlist", "4", "--out", str(tmp_path / "l.tokens"), *shards]) == 0
    with pytest.raises(ValueError, match="'O' neighbourhood"):
        main(["generate", "--benchmark", "mjhq", "--prompts", str(world / "meta_data.json"), "--method", "showo_daid",
              "--variant", "lam0.5_tau1.0", "--backbone", str(world / "showo"), "--device", "cpu", "--maskgit-steps",
              "2", "--index", str(tmp_path / "l.tokens"), "--images", str(tmp_path / "i"), "--record",
              str(tmp_path / "r.json")])
