"""RA-CM3: where the retrieved image's tokens go (after BOS, both CFG branches), the CLIP index (top-n, a
training image never retrieves itself), fine-tuning (loss falls) and generation through `arrag generate`."""

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from arrag.cli import main
from arrag.clip import ClipIndex, ClipSpec, build_clip_index, load_clip_encoder, pixels_sha256
from arrag.models.janus import (
    SamplingConfig,
    build_tiny_backbone,
    forward_teacher_forced,
    generate_tokens,
    insert_prefix,
    load_backbone,
    tokenize_prompts,
    unconditional_ids,
)
from arrag.racm3 import PrefixRetriever, RACM3Config, finetune_racm3, vq_tokens
from arrag.shapes.benchmarks import BenchmarkSizes, write_benchmarks
from arrag.shapes.dataset import ShapesConfig, read_annotations, write_split
from arrag.training.clip import MODEL_CONFIG_FILE, WEIGHTS_FILE, ClipTrainConfig, model_config, save_clip
from arrag.training.finetune import FinetuneConfig

WORLD = ShapesConfig(seed=3, image_size=16)
PROMPTS = ["a red circle", "two blue squares left of a green star", "a photo of a star"]
TINY_CLIP = ClipTrainConfig(image_size=32, vision_width=8, text_width=32, text_layers=1, context_length=16,
                            embed_dim=16)


def tiny_backbone(captions):
    torch.manual_seed(0)
    backbone = build_tiny_backbone(captions, image_size=16, patch_size=4, codebook_size=32, hidden_size=32,
                                   num_layers=2, num_heads=2, intermediate_size=64)
    with torch.no_grad():  # wider weights: greedy tokens vary and the prefix visibly matters
        for p in backbone.model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return backbone


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Train and database splits, a saved tiny backbone, a random tiny Shapes-CLIP and its index."""
    root = tmp_path_factory.mktemp("racm3")
    train = write_split(root / "train", "train", 16, WORLD)
    write_split(root / "database", "database", 24, WORLD)
    tiny_backbone([r["caption"] for r in train] + PROMPTS).save_pretrained(root / "backbone")
    torch.manual_seed(0)
    save_clip(open_clip.CLIP(**model_config(TINY_CLIP)).eval(), TINY_CLIP, root / "clip")
    spec = ClipSpec(None, str(root / "clip" / WEIGHTS_FILE), str(root / "clip" / MODEL_CONFIG_FILE))
    build_clip_index(root / "database", root / "index", load_clip_encoder(spec))
    return root


def test_prefix_goes_right_after_bos_in_every_row():
    embeds = torch.arange(10.0).view(2, 5, 1)  # row 0: two pads, BOS at 2; row 1: BOS at 0
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    prefix = -torch.arange(1.0, 7.0).view(2, 3, 1)
    out, new_mask = insert_prefix(embeds, mask, prefix)
    assert out.shape == (2, 8, 1)
    assert out[0, :, 0].tolist() == [0, 1, 2, -1, -2, -3, 3, 4]
    assert out[1, :, 0].tolist() == [5, -4, -5, -6, 6, 7, 8, 9]
    assert new_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]


def test_teacher_forcing_with_prefix_equals_the_sequence_built_by_hand():
    backbone = tiny_backbone(PROMPTS)
    model = backbone.model
    ids, _ = tokenize_prompts(backbone, PROMPTS[:1])  # one row, no padding
    prefix = torch.tensor([[3, 1, 4, 1, 5, 9]])
    targets = torch.randint(0, 32, (1, backbone.num_image_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = forward_teacher_forced(backbone, ids, targets, prefix_image_tokens=prefix)
        text, image = model.get_input_embeddings(), model.prepare_embeddings_for_image_generation
        by_hand = torch.cat([text(ids[:, :1]), image(prefix), text(ids[:, 1:]), image(targets)], dim=1)
        hidden = model.model.language_model(inputs_embeds=by_hand).last_hidden_state
        start = ids.shape[1] + prefix.shape[1] - 1  # the position of BOI predicts image token 0
        expected = model.model.generation_head(hidden[:, start:start + backbone.num_image_tokens])
        plain = forward_teacher_forced(backbone, ids, targets)
    assert ours.shape == (1, backbone.num_image_tokens, 32)
    assert torch.allclose(ours, expected, atol=1e-5)  # the same operations: measured equal; 1e-5 ~ 10 ulp of logits ~8
    assert not torch.allclose(ours, plain, atol=1e-3)  # the prefix moves logits by up to 5 (measured)


def test_decode_with_prefix_matches_teacher_forcing_and_cfg_keeps_the_prefix():
    """Both CFG branches get the prefix: the decode loop's probabilities equal CFG over teacher-forced logits of
    (prefix + caption) and (prefix + unconditional prompt); rows are independent of their batch."""
    backbone = tiny_backbone(PROMPTS)
    prefix = torch.randint(0, 32, (3, 8), generator=torch.Generator().manual_seed(1))
    captured = []

    def capture(probs, tokens, step):
        captured.append(probs)
        return probs

    sampling = SamplingConfig(cfg_weight=2.0, greedy=True)
    tokens = generate_tokens(backbone, PROMPTS, [0, 1, 2], sampling, prob_hook=capture, prefix_image_tokens=prefix)
    probs = torch.stack(captured, 1)  # [3, N, V]
    ids, mask = tokenize_prompts(backbone, PROMPTS)
    with torch.no_grad():
        cond = forward_teacher_forced(backbone, ids, tokens, mask, prefix_image_tokens=prefix)
        uncond = forward_teacher_forced(backbone, unconditional_ids(backbone, ids), tokens, mask,
                                        prefix_image_tokens=prefix)
    # float32 logits up to ~10, cached step-by-step vs one full forward: measured 2e-6 apart; 1e-5 leaves 5x
    assert torch.allclose(torch.softmax(uncond + 2.0 * (cond - uncond), -1), probs, atol=1e-5)
    # Row 0 (left-padded in the batch) alone: its probabilities agree within the same 1e-5 (measured 1e-6), and at
    # every step its top-1 leads its top-2 by far more than twice that, so its greedy tokens must be equal.
    top2 = probs[0].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1] > 1e-3).all()  # measured: >= 8e-3
    captured.clear()
    alone = generate_tokens(backbone, PROMPTS[:1], [0], sampling, prob_hook=capture, prefix_image_tokens=prefix[:1])
    assert torch.allclose(torch.stack(captured, 1)[0], probs[0], atol=1e-5) and torch.equal(alone, tokens[:1])
    assert not torch.equal(tokens, generate_tokens(backbone, PROMPTS, [0, 1, 2], sampling))


def constructed_embedding(files: list[Path], *args) -> np.ndarray:
    """Image files -> [n, 16] float32 unit vectors, one seeded random vector per image number (the file stem's
    integer): pairwise cosines of 24 of them stay far from 1, unlike an untrained CLIP's near-equal embeddings."""
    vectors = np.stack([np.random.default_rng(int(Path(f).stem.rsplit("-", 1)[1])).normal(size=16) for f in files])
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_index_top_n_and_a_query_never_retrieves_itself(world, tmp_path, monkeypatch):
    encoder = load_clip_encoder(ClipSpec(None, str(world / "clip" / WEIGHTS_FILE),
                                         str(world / "clip" / MODEL_CONFIG_FILE)))
    monkeypatch.setattr(encoder, "embed_image_files", constructed_embedding)
    build_clip_index(world / "database", tmp_path / "index", encoder)
    index = ClipIndex(tmp_path / "index", encoder=encoder)
    assert index.meta["n"] == 24 and index.index.ntotal == 24 and index.meta["clip"]["model"] == "shapes_clip"
    assert index.entries[0]["id"] == "database-000000" and index.path(0).is_file()
    scores, rows = index.search(PROMPTS, top_n=3)
    assert rows.shape == scores.shape == (3, 3) and (np.diff(scores, axis=1) <= 0).all()  # FAISS sorts what it returns
    # queries that are database images' own embeddings: top-1 is the image itself unless it is excluded
    files = [index.path(r) for r in range(24)]
    own = constructed_embedding(files)
    cosines = own.astype(np.float64) @ own.T.astype(np.float64)
    # self 1, any other image <= 0.9 (measured 0.58): a margin of at least 0.1, far above the float32 error of 16-d
    # inner products of unit vectors (at most ~16 * 6e-8 ~ 1e-6)
    assert (cosines[~np.eye(24, dtype=bool)] <= 0.9).all()
    monkeypatch.setattr(encoder, "embed_texts", lambda texts: own[:len(texts)])
    assert index.search(["q"] * 24, top_n=1)[1][:, 0].tolist() == list(range(24))
    kept_scores, kept = index.search(["q"] * 24, top_n=3, exclude=[{pixels_sha256(f)} for f in files])
    assert all(r not in row for r, row in enumerate(kept.tolist())) and all(len(set(row)) == 3 for row in kept)
    # the 3 nearest other images, compared by score so that ties may come in any order (score error ~1e-6, above;
    # 1e-5 leaves 10x)
    others = np.where(np.eye(24, dtype=bool), -np.inf, cosines)
    np.testing.assert_allclose(kept_scores, -np.sort(-others, axis=1)[:, :3], atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(cosines, kept, 1), kept_scores, atol=1e-5)


def test_index_refuses_other_clip_weights(world, tmp_path):
    torch.manual_seed(1)
    save_clip(open_clip.CLIP(**model_config(TINY_CLIP)), TINY_CLIP, tmp_path / "other")
    other = load_clip_encoder(ClipSpec(None, str(tmp_path / "other" / WEIGHTS_FILE),
                                       str(tmp_path / "other" / MODEL_CONFIG_FILE)))
    with pytest.raises(ValueError, match="other CLIP weights"):
        ClipIndex(world / "index", encoder=other)


def test_finetune_loss_falls_and_generation_runs_through_the_cli(world, tmp_path):
    config = RACM3Config(top_n=2, caption_dropout=0.1, finetune=FinetuneConfig(
        epochs=30, global_batch=8, micro_batch=4, lr=2e-2, lora_rank=4, lora_alpha=8, checkpoint_every=10))
    metrics = finetune_racm3(str(world / "backbone"), world / "train", world / "index", tmp_path / "racm3",
                             tmp_path / "ckpt", config)
    # measured drop (first - last) over FinetuneConfig seeds 0-4, at 1 and 2 threads: 2.75-2.89; the floor is far under
    assert metrics["optimizer_steps"] == 60 and metrics["loss_last"] < metrics["loss_first"] - 0.5
    assert set(metrics["retrieval"]) == {"n", "top1_objects", "top1_classes", "chance_objects", "chance_classes"}
    lines = (tmp_path / "racm3" / "retrievals.jsonl").read_text().splitlines()
    assert len(lines) == 16 and all(len(json.loads(line)["retrieved"]) == 2 for line in lines)
    assert json.loads((tmp_path / "racm3" / "racm3.json").read_text())["top_n"] == 2

    heldout = write_split(tmp_path / "heldout", "heldout", 6, WORLD)
    write_benchmarks(tmp_path / "bench", WORLD, BenchmarkSizes(geneval_per_tag=1, dpg_prompts=2, mjhq_images=5),
                     tmp_path / "heldout", heldout)
    args = ["generate", "--benchmark", "mjhq", "--prompts", str(tmp_path / "bench" / "mjhq" / "meta_data.json"),
            "--method", "racm3", "--backbone", str(world / "backbone"), "--weights", str(tmp_path / "racm3"),
            "--clip-index", str(world / "index"), "--device", "cpu", "--micro-batch", "4",
            "--images", str(tmp_path / "images"), "--record", str(tmp_path / "record.json")]
    assert main(args) == 0
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["method"] == "racm3" and record["images_generated"] == 5 and record["generation_seconds"] > 0
    assert record["method_settings"]["top_n"] == 2 and record["method_settings"]["database_images"] == 24
    assert len(list((tmp_path / "images").rglob("*.png"))) == 5
    assert main(args[:-2] + ["--record", str(tmp_path / "again.json")]) == 0  # resumable: nothing left to do
    assert json.loads((tmp_path / "again.json").read_text())["images_skipped"] == 5


def test_prefix_retriever_returns_tokens_of_the_retrieved_images(world):
    backbone = load_backbone(str(world / "backbone"))
    index = ClipIndex(world / "index")
    retriever = PrefixRetriever(index, backbone, top_n=2)
    _, rows = retriever.retrieve(PROMPTS)
    tokens = retriever(PROMPTS)
    assert tokens.shape == (3, 2 * backbone.num_image_tokens)
    expected = vq_tokens(backbone, [index.path(r) for r in rows[0]])
    assert torch.equal(tokens[0], expected.flatten())
    assert [r["id"] for r in read_annotations(world / "database")][rows[0, 0]] == index.entries[rows[0, 0]]["id"]
