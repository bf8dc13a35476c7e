"""DAiD's merge (Eq. 2-4) against hand-computed values, duplicates and invalid entries included.

The merge computes in float64 and returns float32 probabilities (<= 1): rounding moves them by <= 6e-8, so
hand-computed values agree within abs 1e-7."""

import math

import pytest
import torch

from arrag.daid import merge_distributions


def test_hand_computed_row():
    p_model = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    tokens = torch.tensor([[1, 3]])
    distances = torch.tensor([[0.0, 1.0]])
    merged = merge_distributions(p_model, tokens, distances, tau=1.0, lam=0.4)
    w1, w3 = 1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))
    expected = [0.6 * 0.5, 0.6 * 0.25 + 0.4 * w1, 0.6 * 0.25, 0.4 * w3]
    assert merged[0].tolist() == pytest.approx(expected, abs=1e-7)


def test_duplicates_sum_their_weights_and_invalid_entries_are_ignored():
    p_model = torch.full((1, 3), 1 / 3)
    tokens = torch.tensor([[2, 2, -1, 0]])
    distances = torch.tensor([[1.0, 1.0, 0.0, 1.0]])  # the invalid entry has the smallest distance
    merged = merge_distributions(p_model, tokens, distances, tau=0.5, lam=1.0)
    assert merged[0].tolist() == pytest.approx([1 / 3, 0.0, 2 / 3], abs=1e-7)


def test_temperature_sharpens_towards_the_nearest_token():
    p_model = torch.full((1, 2), 0.5)
    tokens, distances = torch.tensor([[0, 1]]), torch.tensor([[1.0, 2.0]])
    soft = merge_distributions(p_model, tokens, distances, tau=10.0, lam=1.0)
    sharp = merge_distributions(p_model, tokens, distances, tau=0.01, lam=1.0)
    assert soft[0, 0] == pytest.approx(1 / (1 + math.exp(-0.1)), abs=1e-6)  # float32 rounding: 6e-8
    assert sharp[0, 0] == pytest.approx(1.0, abs=1e-12)  # 1 - e^-100 rounds to exactly 1.0 in float32


def test_rows_without_valid_tokens_keep_the_model_distribution():
    p_model = torch.tensor([[0.1, 0.9], [0.7, 0.3]])
    tokens = torch.tensor([[-1, -1], [1, -1]])
    distances = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    merged = merge_distributions(p_model, tokens, distances, tau=1.0, lam=0.5)
    assert torch.equal(merged[0], p_model[0])
    assert merged[1].tolist() == pytest.approx([0.35, 0.65])  # float32 rounding: within approx's 1e-6 relative


def test_lambda_zero_is_the_model_and_rows_sum_to_one():
    generator = torch.Generator().manual_seed(0)
    p_model = torch.softmax(torch.randn(5, 50, generator=generator), dim=-1)
    tokens = torch.randint(-1, 50, (5, 20), generator=generator)
    distances = torch.rand(5, 20, generator=generator) * 4
    # (1 - 0) * p in float64, back to float32: p itself (measured equal)
    assert torch.allclose(merge_distributions(p_model, tokens, distances, 1.0, 0.0), p_model)
    merged = merge_distributions(p_model, tokens, distances, tau=0.3, lam=0.7)
    # 50 float32 roundings of <= 6e-8 relative in a sum of 1: measured 1.2e-7 off; 1e-6 leaves 8x
    assert torch.allclose(merged.sum(-1), torch.ones(5), atol=1e-6)
    assert (merged >= 0).all()


def test_retrieval_setting_is_checked():
    from arrag.daid import DAiDSettings

    assert DAiDSettings().retrieval == "patches"  # the official selection unless asked otherwise
    with pytest.raises(ValueError, match="DAiD retrieval 'unique'"):
        DAiDSettings(retrieval="unique")


# ------------------------------------------------------------------ DAiD in the decode loop, on a tiny index


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random backbone (16x16 images, 4x4 tokens, 32 codes) and a flat index over 12 Shapes renders."""
    from arrag.models.janus import build_tiny_backbone
    from arrag.patchdb.build import IndexParams, add_shard, merge_index, train_index
    from arrag.patchdb.encode import encode_shard
    from arrag.patchdb.neighbourhood import KeySpec
    from arrag.patchdb.sources import Exclusions, read_sources
    from arrag.shapes.dataset import ShapesConfig, write_split

    root = tmp_path_factory.mktemp("daid")
    torch.manual_seed(0)
    backbone = build_tiny_backbone(["a red circle", "two blue squares"], image_size=16, patch_size=4, codebook_size=32,
                                   hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    write_split(root / "database", "database", 12, ShapesConfig(image_size=16))
    indexes = {}
    for policy in ("zero", "skip"):
        folder = root / policy
        folder.mkdir()
        encode_shard(backbone.vq, read_sources(root / "database"), 0, 1, KeySpec("L", "1", "codebook", policy),
                     Exclusions(), folder / "shard.npz", batch_size=6)
        train_index([folder / "shard.npz"], folder / "trained", IndexParams(kind="flat"))
        add_shard(folder / "trained", folder / "shard.npz", folder / "added")
        merge_index([folder / "added"], [folder / "shard.npz"], folder / "index")
        indexes[policy] = folder / "index"
    return backbone, indexes


def generate(backbone, hook=None):
    from arrag.models.janus import SamplingConfig, generate_tokens

    prompts = ["a red circle", "two blue squares", "a red circle"]
    return generate_tokens(backbone, prompts, [1, 2, 3], SamplingConfig(cfg_weight=3.0), prob_hook=hook)


def test_lambda_zero_gives_the_vanilla_tokens(setup):
    from arrag.daid import DAiDHook, DAiDSettings, load_index_for

    backbone, indexes = setup
    hook = DAiDHook(load_index_for(backbone.vq, indexes["zero"]), DAiDSettings(k=8, tau=1.0, lam=0.0))
    assert torch.equal(generate(backbone, hook), generate(backbone))
    assert hook.seconds > 0


def test_overlapped_retrieval_gives_the_same_tokens(setup):
    from arrag.daid import DAiDHook, DAiDSettings, load_index_for

    backbone, indexes = setup
    index = load_index_for(backbone.vq, indexes["zero"])
    settings = DAiDSettings(k=8, tau=1.0, lam=0.7)
    overlapped, serial = DAiDHook(index, settings, overlap=True), DAiDHook(index, settings)
    tokens = generate(backbone, overlapped)
    assert torch.equal(tokens, generate(backbone, serial)) and not torch.equal(tokens, generate(backbone))
    assert overlapped._pending is None  # every prefetched search was consumed by its step


def test_lambda_one_samples_only_retrieved_tokens(setup):
    from arrag.daid import DAiDHook, DAiDSettings, load_index_for

    backbone, indexes = setup
    index = load_index_for(backbone.vq, indexes["zero"])
    tokens = generate(backbone, DAiDHook(index, DAiDSettings(k=3, tau=1.0, lam=1.0)))
    for step in range(tokens.shape[1]):
        _, usable = index.queries(tokens[:, :step], step)
        retrieved, _ = index.retrieve(tokens[:, :step], step, 3, "patches")
        assert usable.all()
        for row in range(len(tokens)):
            assert tokens[row, step] in retrieved[row].tolist()


def test_skip_policy_leaves_the_first_row_and_edge_columns_to_the_model(setup):
    from arrag.daid import DAiDHook, DAiDSettings, load_index_for

    backbone, indexes = setup
    index = load_index_for(backbone.vq, indexes["skip"])
    hook = DAiDHook(index, DAiDSettings(k=3, tau=1.0, lam=1.0))
    augmented, vanilla = generate(backbone, hook), generate(backbone)
    grid = backbone.grid_size
    edges = [p for p in range(grid * grid) if p < grid or p % grid in (0, grid - 1)]
    first_inner = min(set(range(grid * grid)) - set(edges))
    assert torch.equal(augmented[:, :first_inner], vanilla[:, :first_inner])  # nothing to retrieve before
    for step in range(grid * grid):
        _, usable = index.queries(augmented[:, :step], step)
        assert bool(usable.all()) == (step not in edges)


def test_index_of_another_codebook_is_refused(setup):
    from arrag.daid import load_index_for
    from arrag.models.janus import build_tiny_backbone
    from arrag.patchdb.fingerprint import FingerprintMismatch

    _, indexes = setup
    torch.manual_seed(7)
    other = build_tiny_backbone(["a"], image_size=16, patch_size=4, codebook_size=32, hidden_size=32, num_layers=1,
                                num_heads=2, intermediate_size=64)
    with pytest.raises(FingerprintMismatch, match="codebook_sha256"):
        load_index_for(other.vq, indexes["zero"])


def test_selection_picks_the_lowest_fid_or_the_pinned_values(tmp_path):
    import json

    from arrag.select import parse_cell, select

    paths = []
    for cell, fid in [("lam0.1_tau0.5", 30.0), ("lam0.3_tau1.0", 20.0), ("lam0.5_tau1.0", 25.0)]:
        path = tmp_path / cell / "fid.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"fid": fid}))
        paths.append(path)
    record = select("daid", paths)
    assert record["values"] == {"lam": 0.3, "tau": 1.0} and record["fid"] == 20.0 and not record["pinned"]
    assert select("daid", paths, {"lam": 0.2, "tau": 2.0})["values"] == {"lam": 0.2, "tau": 2.0}
    assert parse_cell("hops12_m2") == {"hops": "12", "m": 2}
