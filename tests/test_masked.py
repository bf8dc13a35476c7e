"""AR-RAG on Show-o's masked decoding: masked-position queries, DAiD hook, FAiD blenders over masked windows, and
the training data and loss from Show-o's noising process."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arrag.daid import DAiDSettings
from arrag.faid.augment import FAiDSettings
from arrag.faid.blender import Blender
from arrag.masked import (
    MaskedDAiDHook,
    centre_tap,
    faid_for_showo,
    masked_blend,
    masked_decode_modules,
    masked_faid_loss,
    masked_teacher_forced_modules,
    noised_retrievals,
    retrieve_masked,
    undecided,
)
from arrag.models.janus import derive_seed
from arrag.models.showo import (
    MaskGitSampling,
    build_tiny_showo,
    final_half,
    forward_teacher_forced,
    generate_tokens,
    text_ids,
)
from arrag.patchdb.index import PatchIndex
from arrag.patchdb.neighbourhood import KeySpec, grid_queries

WORDS = "a the red green blue circle square triangle star left right of above below and two three .".split()
PROMPTS = ["a red circle", "two blue squares left of a green star", "the star"]
SEEDS = [derive_seed(0, i, 0) for i in range(len(PROMPTS))]
STEPS = 6
SAMPLING = MaskGitSampling(guidance_scale=2.0, steps=STEPS)
CODES, SIDE = 64, 4


def build_index(root, spec: KeySpec, codebook: torch.Tensor, grids: torch.Tensor) -> PatchIndex:
    """A flat index over token grids [n, side, side], built in `root` by the project's build steps."""
    from arrag.patchdb.build import IndexParams, add_shard, merge_index, train_index
    from arrag.patchdb.encode import save_npz_atomic
    from arrag.patchdb.fingerprint import Fingerprint

    root.mkdir(parents=True)
    meta = {"fingerprint": Fingerprint.expected(codebook, grids.shape[1], spec).to_dict(), "shard": 0, "shards": 1,
            "sources": [{"name": "toy", "revision": "none", "kept": len(grids)}], "exclusions_sha256": "none",
            "images": len(grids)}
    save_npz_atomic(root / "shard.npz", tokens=grids.numpy().astype(np.uint16),
                    image_ids=np.array([f"img{i:03d}" for i in range(len(grids))]),
                    source=np.zeros(len(grids), np.uint8), codebook=codebook.numpy(), meta=np.array(json.dumps(meta)))
    train_index([root / "shard.npz"], root / "trained", IndexParams(kind="flat"))
    add_shard(root / "trained", root / "shard.npz", root / "added")
    merge_index([root / "added"], [root / "shard.npz"], root / "index")
    return PatchIndex.load(root / "index")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Show-o (hidden 64, 2 layers, 4 x 4 grid, 64 codes; weights widened so that logits vary) and flat
    indexes over 24 random grids with O (zero and skip edges) and L hop-1 keys."""
    torch.manual_seed(0)
    backbone = build_tiny_showo(WORDS, codebook_size=CODES, grid_size=SIDE, max_text_len=8, hidden_size=64,
                                num_layers=2, num_heads=2, intermediate_size=128)
    with torch.no_grad():
        for p in backbone.model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    codebook = F.normalize(torch.randn(CODES, 8), dim=-1)
    grids = torch.randint(0, CODES, (24, SIDE, SIDE))
    root = tmp_path_factory.mktemp("masked")
    specs = {"O": KeySpec("O", "1"), "O_skip": KeySpec("O", "1", edge_policy="skip"), "L": KeySpec("L", "1")}
    indexes = {name: build_index(root / name, spec, codebook, grids) for name, spec in specs.items()}
    return backbone, indexes


def count_searches(index: PatchIndex) -> list:
    """Replace index.search by a recording wrapper; returns the list of query batches it receives."""
    calls, search = [], index.search

    def recording(queries, k, distinct=None, salt=0):
        calls.append(queries.clone())
        return search(queries, k, distinct, salt)

    index.search = recording
    return calls


class RecordingHook(MaskedDAiDHook):
    """MaskedDAiDHook that keeps the grid of every call."""

    def __init__(self, index, settings):
        super().__init__(index, settings)
        self.grids = []

    def __call__(self, probs, grid, step, steps):
        self.grids.append(grid.clone())
        return super().__call__(probs, grid, step, steps)


def generate(backbone, hook=None, modules=None):
    return generate_tokens(backbone, PROMPTS, SEEDS, SAMPLING, prob_hook=hook, hook_steps=final_half(STEPS),
                           layer_modules=modules)


# ---------------------------------------------------------------------------------------------------------- queries


def test_queries_use_only_decoded_neighbours(world):
    backbone, indexes = world
    index = dataclasses.replace(indexes["O"])  # its own search method
    calls = count_searches(index)
    mask_id = backbone.config.mask_token_id
    tokens = torch.arange(SIDE * SIDE).view(1, -1) * 3 % CODES
    masked = torch.zeros(1, SIDE * SIDE, dtype=torch.bool)
    masked[0, [0, 5, 6, 9, 15]] = True
    grid = torch.where(masked, mask_id, tokens)
    retrieved, distances = retrieve_masked(index, grid, undecided(grid, CODES), 3, "patches")
    expected, _ = grid_queries(torch.where(masked, -1, tokens).view(1, SIDE, SIDE), index.codebook, index.spec)
    wanted = expected[0, masked[0]]  # the masked positions' queries
    assert len(calls) == 1  # one search, of the distinct queries of masked positions only
    assert torch.equal(torch.unique(calls[0], dim=0), torch.unique(wanted, dim=0)) and len(calls[0]) == len(
        torch.unique(wanted, dim=0))
    # by hand: cell 5 = (1, 1); its neighbours 0 1 2 / 4 6 / 8 9 10, of which 0, 6 and 9 are masked
    by_hand = torch.cat([torch.zeros(8) if p in (0, 6, 9) else index.codebook[tokens[0, p]]
                         for p in (0, 1, 2, 4, 6, 8, 9, 10)])
    assert torch.equal(wanted[1], by_hand)
    own_tokens, own_distances = index.search(wanted, 3, "patches")  # each position: its own query's results
    assert torch.equal(retrieved[masked], own_tokens) and torch.equal(distances[masked], own_distances)
    assert (retrieved[~masked] == -1).all() and (retrieved[masked] >= 0).all()
    assert torch.isinf(distances[~masked]).all()


def test_positions_with_the_same_neighbours_share_one_query(world):
    backbone, indexes = world
    index = dataclasses.replace(indexes["O"])
    calls = count_searches(index)
    grid = torch.full((2, SIDE * SIDE), backbone.config.mask_token_id)  # nothing decoded: every neighbour missing
    retrieved, _ = retrieve_masked(index, grid, undecided(grid, CODES), 3, "patches")
    assert len(calls) == 1 and len(calls[0]) == 1
    # every position gets the one query's result: the distinct tokens of the 3 nearest patches, which may be fewer
    # than 3 (-1 after them; how many depends on near-ties of the patches' key norms, so on the CPU's summation)
    own_tokens, _ = index.search(calls[0], 3, "patches")
    assert (retrieved == own_tokens[0]).all() and (own_tokens[0, 0] >= 0)


def test_skip_policy_queries_inner_masked_cells_only(world):
    backbone, indexes = world
    grid = torch.full((2, SIDE * SIDE), backbone.config.mask_token_id)
    retrieved, _ = retrieve_masked(indexes["O_skip"], grid, undecided(grid, CODES), 2, None)
    inner = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    inner[1:-1, 1:-1] = True
    assert ((retrieved[:, :, 0] >= 0) == inner.flatten()).all()


def test_an_l_index_is_refused(world):
    backbone, indexes = world
    with pytest.raises(ValueError, match="'O' neighbourhood"):
        MaskedDAiDHook(indexes["L"], DAiDSettings(k=3))
    faid = faid_for_showo(backbone, FAiDSettings(hops="1", m=1, k=3))
    with pytest.raises(ValueError, match="'O' neighbourhood"):
        masked_decode_modules(backbone, faid, indexes["L"])
    with pytest.raises(ValueError, match="'O' neighbourhood"):
        noised_retrievals(torch.zeros(1, SIDE * SIDE, dtype=torch.long), indexes["L"], 3, torch.Generator())


# ---------------------------------------------------------------------------------------------------------- DAiD


def test_lambda_zero_gives_the_vanilla_tokens(world):
    backbone, indexes = world
    hook = MaskedDAiDHook(indexes["O"], DAiDSettings(k=4, tau=1.0, lam=0.0))
    # exact: lambda 0 merges to p * 1 + 0 (in float64, back to float32), the same probabilities to the bit
    assert torch.equal(generate(backbone, hook), generate(backbone))
    assert hook.seconds > 0


def test_lambda_one_decides_retrieved_tokens_at_the_hooked_steps_only(world):
    backbone, indexes = world
    index = dataclasses.replace(indexes["O"])
    calls = count_searches(index)
    hook = RecordingHook(index, DAiDSettings(k=3, tau=1.0, lam=1.0))
    tokens = generate(backbone, hook)
    assert hook.steps_seen == list(final_half(STEPS)) and len(calls) == len(hook.steps_seen)  # one search a step
    states = [*hook.grids, tokens]
    decided_total = 0
    for step, before, after in zip(hook.steps_seen, hook.grids, states[1:], strict=True):
        masked = undecided(before, CODES)
        decided = masked & ~undecided(after, CODES)
        retrieved, _ = retrieve_masked(index, before, masked, 3, "patches", step)  # the hook salts with the step
        for b, p in decided.nonzero().tolist():
            assert int(after[b, p]) in retrieved[b, p].tolist()
        decided_total += int(decided.sum())
    assert decided_total == int(undecided(hook.grids[0], CODES).sum())  # every position left at the first hook
    assert not torch.equal(tokens, generate(backbone))


# ---------------------------------------------------------------------------------------------------------- FAiD


def random_blender(hops, dim=12, grid=5, seed=0):
    torch.manual_seed(seed)
    blender = Blender(dim, grid, hops, init="official").double()
    with torch.no_grad():  # non-trivial biases and norm weights so that every term is exercised
        for p in blender.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.5)
    return blender


def direct_masked_blend(blender, states, masked, patches):
    """Reference: for each position, each patch and each level, the official two convolutions on the explicit
    (2h+1)-window (decoded states, zeros elsewhere, the normalised patch at the centre)."""
    batch, n, dim = states.shape
    side, k = blender.grid, patches.shape[2]
    grid = torch.where(masked.unsqueeze(-1), 0.0, states).transpose(1, 2).reshape(batch, dim, side, side)
    padded = F.pad(grid, [blender.reach] * 4)
    normed = blender.norm(patches)
    refined = torch.zeros(batch, n, k, dim, dtype=states.dtype)
    for i in range(n):
        row, col = divmod(i, side)
        for j, h in enumerate(blender.levels):
            top, left = row + blender.reach - h, col + blender.reach - h
            window = padded[:, :, top:top + 2 * h + 1, left:left + 2 * h + 1].unsqueeze(1).repeat(1, k, 1, 1, 1)
            window[:, :, :, h, h] = normed[:, i]
            out = blender.second[j](blender.first[j](window.flatten(0, 1))).reshape(batch, k, dim)
            refined[:, i] += blender.level_weights()[j] * out
    carry = blender.compatibility(refined) * refined
    return carry.mean(2) * masked.unsqueeze(-1), carry


@pytest.mark.parametrize("hops", ["1", "2", "12"])
def test_masked_window_equals_the_official_convolutions(hops):
    blender = random_blender(hops)
    torch.manual_seed(1)
    states, patches = torch.randn(2, 25, 12, dtype=torch.float64), torch.randn(2, 25, 3, 12, dtype=torch.float64)
    masked = torch.rand(2, 25) < 0.5
    residual, carry = masked_blend(blender, states, masked, patches)
    expected_residual, expected_carry = direct_masked_blend(blender, states, masked, patches)
    # float64 sums in another order: measured 1.3e-15 apart; assert_close's float64 defaults (1e-7) are safe
    torch.testing.assert_close(residual, expected_residual)
    torch.testing.assert_close(carry[masked], expected_carry[masked])
    assert (residual[~masked] == 0).all()
    torch.testing.assert_close(centre_tap(blender), blender.taps()[0])


def test_the_masked_window_never_reads_a_masked_state():
    blender = random_blender("12")
    torch.manual_seed(2)
    states, patches = torch.randn(1, 25, 12, dtype=torch.float64), torch.randn(1, 25, 3, 12, dtype=torch.float64)
    masked = torch.zeros(1, 25, dtype=torch.bool)
    masked[0, [6, 7, 12, 18]] = True
    residual, carry = masked_blend(blender, states, masked, patches)
    perturbed = states.clone()
    perturbed[0, [7, 12, 18]] += 100 * torch.randn(3, 12, dtype=torch.float64)  # masked neighbours of cell 6
    again, carry_again = masked_blend(blender, perturbed, masked, patches)
    assert torch.equal(again, residual) and torch.equal(carry_again, carry)
    perturbed = states.clone()
    perturbed[0, 11] += 1.0  # a decoded neighbour of cell 6 (and of 7 and 12): an O(1) change, far over the tolerance
    assert not torch.allclose(masked_blend(blender, perturbed, masked, patches)[0][0, 6], residual[0, 6])


def test_zero_initialised_faid_leaves_logits_and_tokens_unchanged(world):
    backbone, indexes = world
    faid = faid_for_showo(backbone, FAiDSettings(hops="12", m=2, k=3, init="zero"))
    assert faid.layers == [0, 1]
    tokens = generate(backbone, modules=masked_decode_modules(backbone, faid, indexes["O"]))
    # exact: zero weights and biases make every residual exactly zero, added after the same operations as the plain
    # forward's decoder layer
    assert torch.equal(tokens, generate(backbone)) and faid.retrieval_seconds > 0
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CODES, (3, SIDE * SIDE), generator=generator)
    data = noised_retrievals(tokens, indexes["O"], 3, generator)
    grid = torch.where(data["masked"], backbone.config.mask_token_id, tokens)
    with torch.no_grad():
        modules = masked_teacher_forced_modules(backbone, faid, data["retrieved"])
        assert torch.equal(forward_teacher_forced(backbone, PROMPTS, grid, modules),
                           forward_teacher_forced(backbone, PROMPTS, grid))  # exact, as the tokens above


def test_faid_acts_in_the_final_half_only_and_on_masked_positions(world):
    backbone, indexes = world
    faid = faid_for_showo(backbone, FAiDSettings(hops="12", m=2, k=3, init="official"))
    index = dataclasses.replace(indexes["O"])
    calls = count_searches(index)
    modules = masked_decode_modules(backbone, faid, index)
    torch.manual_seed(3)
    states = torch.randn(2, SIDE * SIDE, 64)
    grid = torch.randint(0, CODES, (2, SIDE * SIDE))
    grid[:, ::3] = backbone.config.mask_token_id
    masked = undecided(grid, CODES)
    with torch.no_grad():
        for step in range(STEPS):
            residuals = [modules[layer](states, grid, step, STEPS) for layer in faid.layers]
            if step < STEPS // 2:
                assert all(r is None for r in residuals)
            else:
                for residual in residuals:
                    assert residual.shape == states.shape
                    assert (residual[~masked] == 0).all() and (residual[masked].abs().sum(-1) > 0).all()
    assert len(calls) == STEPS - STEPS // 2  # one search a step, shared by the blenders
    tokens = generate(backbone, modules=masked_decode_modules(backbone, faid, indexes["O"]))
    assert not torch.equal(tokens, generate(backbone))


# ---------------------------------------------------------------------------------------------------------- training


def test_noising_follows_show_o_and_retrieves_every_masked_position(world):
    _, indexes = world
    tokens = torch.randint(0, CODES, (8, SIDE * SIDE), generator=torch.Generator().manual_seed(4))
    data = noised_retrievals(tokens, indexes["O"], 3, torch.Generator().manual_seed(5))
    r = torch.rand(8, generator=torch.Generator().manual_seed(5))
    expected = [max(1, round(SIDE * SIDE * math.cos(math.pi / 2 * float(x)))) for x in r]
    assert data["masked"].sum(-1).tolist() == expected
    assert ((data["retrieved"][..., 0] >= 0) == data["masked"]).all()
    again, _ = retrieve_masked(indexes["O"], tokens, data["masked"], 3, None)
    assert torch.equal(data["retrieved"], again)


def test_masked_faid_loss_is_finite_and_trains_the_blenders(world):
    backbone, indexes = world
    faid = faid_for_showo(backbone, FAiDSettings(hops="12", m=2, k=3, init="official"))
    tokens = torch.randint(0, CODES, (4, SIDE * SIDE), generator=torch.Generator().manual_seed(7))
    data = noised_retrievals(tokens, indexes["O"], 3, torch.Generator().manual_seed(8))
    batch = {"text": text_ids(backbone, PROMPTS + ["a star"]), "image_tokens": tokens, "masked": data["masked"],
             "retrieved": data["retrieved"]}
    loss = masked_faid_loss(backbone, batch, torch.Generator().manual_seed(9), faid=faid, caption_dropout=0.25)
    assert torch.isfinite(loss)
    loss.backward()
    for name, parameter in faid.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    backbone.model.zero_grad(set_to_none=True)
    with torch.no_grad():  # every caption dropped: the unconditional prompt without blending
        dropped = masked_faid_loss(backbone, batch, torch.Generator(), faid=faid, caption_dropout=1.0)
        grid = torch.where(data["masked"], backbone.config.mask_token_id, tokens)
        logits = forward_teacher_forced(backbone, [""] * 4, grid)
        plain = F.cross_entropy(logits[data["masked"]], tokens[data["masked"]])
    torch.testing.assert_close(dropped, plain)  # float32 defaults: the same logits, reduced alike (equal, measured)
