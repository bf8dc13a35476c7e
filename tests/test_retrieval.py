"""What a search returns (`arrag.patchdb.scan`), on every index type: the k nearest patches, the distinct tokens of
the k nearest patches (DAiD, official), the k nearest distinct tokens (ours), against a brute force over the patches;
tied patches drawn as a uniform sample, seeded from the query.

Parity databases use an integer codebook: every key, query and squared distance is a small integer, exact in float32
and float64, so ties are exact in every index type and the brute force alike, and results compare with equality."""

import math

import numpy as np
import pytest
import torch

from arrag.patchdb import scan
from arrag.patchdb.fingerprint import Fingerprint
from arrag.patchdb.index import PatchIndex
from arrag.patchdb.neighbourhood import KeySpec, codebook_keys, grid_queries, neighbours, vector_table
from arrag.patchdb.token_index import TokenStore, train_lists

MODES = (None, "patches", "distinct_tokens")
# FAISS's IVF-PQ computes a batch's distances (BLAS for >= 20 queries) and a single query's along different routes:
# float32 sums of terms up to ~64 differ by a few of their ulp (7.6e-6 at 64; measured <= 7.6e-6); 5e-5 leaves 6x
ATOL = 5e-5


def wrap(backend, codebook: torch.Tensor, spec: KeySpec, kind: str, grids: np.ndarray | None) -> PatchIndex:
    images = len(grids) if grids is not None else 0
    return PatchIndex(Fingerprint.expected(codebook, 5, spec, kind), codebook, backend, grids,
                      np.array(["a"] * images), np.zeros(images, np.uint8), ["src"])


def database(seed: int = 0, images: int = 40, tokens: int = 5):
    """An integer codebook [10, 3], 5 x 5 grids of `tokens` tokens, L hop-1 keys: per-patch keys [P, 12] float32,
    neighbour tokens [P, 4], values [P], ids [P] (every cell has a key: ids are rows)."""
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.randint(-2, 3, (10, 3), generator=generator).float()
    spec = KeySpec("L", "1")
    grids = torch.randint(tokens, (images, 5, 5), generator=generator)
    keys = codebook_keys(grids, codebook, spec).flatten(0, 2).numpy()
    slots = neighbours(grids, spec, -1).flatten(0, 2).numpy()
    return codebook, spec, grids, keys, slots, grids.flatten().numpy(), np.arange(len(keys))


def make_index(kind: str, codebook, spec, grids, keys, slots, values, ids) -> PatchIndex:
    """The database as a tokens index (8 lists, all probed), a flat index or an ivfpq index (8 lists, 4 probed)."""
    import faiss

    if kind == "tokens":
        centroids = train_lists(np.unique(keys, axis=0), 8, 0)
        return wrap(TokenStore.build(codebook, spec, centroids, slots, values, ids, nprobe=8), codebook, spec, kind,
                    None)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatL2(keys.shape[1]))
    else:
        index = faiss.index_factory(keys.shape[1], "OPQ4,IVF8,PQ4x4")
        index.train(keys)
        faiss.extract_index_ivf(index).nprobe = 4
    index.add_with_ids(keys, ids)
    return wrap(index, codebook, spec, kind, values.reshape(len(grids), -1))


def reference(distances: np.ndarray, tokens: np.ndarray, k: int, distinct: str | None, seed: int):
    """The selection over all patches a query can reach (distances [P], tokens [P]) as `scan` states it, with its
    samplers for the draws -> (tokens, distances) in the order `scan` returns them (PATCHES: sorted by distance, then
    token, since the patches of one distance come in no defined order)."""
    if distinct == "distinct_tokens":
        best = {}
        for token in np.unique(tokens):
            best[int(token)] = distances[tokens == token].min()
        ranked = sorted(best, key=lambda t: (best[t], t))
        if len(ranked) < k:
            return ranked, [best[t] for t in ranked]
        boundary = best[ranked[k - 1]]
        nearer = [t for t in ranked if best[t] < boundary]
        tied = np.array(sorted(t for t in ranked if best[t] == boundary))
        if k - len(nearer) < len(tied):
            weights = np.array([((tokens == t) & (distances == boundary)).sum() for t in tied])
            tied = tied[scan.draw_order(weights, seed)[:k - len(nearer)]]
        chosen = nearer + tied.tolist()
        return chosen, [best[t] for t in chosen]
    taken = np.ones(len(distances), dtype=bool)
    drawn = {}
    if len(distances) > k:
        boundary = np.sort(distances)[k - 1]
        taken = distances < boundary
        tied, counts = np.unique(tokens[distances == boundary], return_counts=True)
        drawn = dict(zip(tied.tolist(), scan.draw_patches(counts, k - taken.sum(), seed).tolist(), strict=True))
        drawn = {t: (n, boundary) for t, n in drawn.items() if n}
    pairs = [(float(d), int(t)) for d, t in zip(distances[taken], tokens[taken], strict=True)]
    pairs += [(float(boundary), t) for t, (n, boundary) in drawn.items() for _ in range(n)]
    if distinct == "patches":
        nearest = {}
        for d, t in pairs:
            nearest[t] = min(d, nearest.get(t, math.inf))
        pairs = [(d, t) for t, d in nearest.items()]
    pairs.sort()
    return [t for _, t in pairs], [d for d, _ in pairs]


def reachable(name: str, index: PatchIndex, query: torch.Tensor, keys: np.ndarray, values: np.ndarray):
    """(distances [P'], tokens [P']) of the patches a query reaches: every patch (flat, tokens with nprobe = nlist),
    or those of its probed lists, as the index's own exhaustive search ranks them (ivfpq)."""
    if name == "ivfpq":
        found = index.backend.search(query[None].numpy(), index.ntotal)
        valid = found[1][0] >= 0
        return found[0][0][valid], values[found[1][0][valid]]
    return ((keys.astype(np.float64) - query.numpy().astype(np.float64)) ** 2).sum(1), values


@pytest.mark.parametrize("name", ["tokens", "flat", "ivfpq"])
def test_every_index_type_equals_the_brute_force_selection(name):
    codebook, spec, grids, keys, slots, values, ids = database()
    index = make_index(name, codebook, spec, grids, keys, slots, values, ids)
    queries, _ = grid_queries(torch.randint(5, (3, 5, 5), generator=torch.Generator().manual_seed(1)), codebook, spec)
    queries = queries.flatten(0, 1)
    salts = torch.arange(len(queries))
    seeds = scan.query_seeds(queries.numpy(), salts.numpy())
    boundary_draws = 0
    for k in (1, 5, 17, 60, 2000):
        for distinct in MODES:
            tokens, distances, found_ids = index.search_patches(queries, k, distinct, salts)
            for row, query in enumerate(queries):
                reach, reach_tokens = reachable(name, index, query, keys, values)
                expected_tokens, expected_distances = reference(reach, reach_tokens, k, distinct, int(seeds[row]))
                valid = tokens[row] >= 0
                got_tokens, got_distances = tokens[row][valid].tolist(), distances[row][valid].tolist()
                if distinct is None:  # the patches of one distance come in no defined order; ids name them
                    patch = found_ids[row][valid].numpy()
                    assert len(set(patch.tolist())) == len(patch) and np.array_equal(values[patch], got_tokens)
                    got = sorted(zip(got_distances, got_tokens, strict=True))
                    got_tokens, got_distances = [t for _, t in got], [d for d, _ in got]
                    if len(reach) > k:
                        boundary = np.sort(reach)[k - 1]
                        boundary_draws += (reach == boundary).sum() > k - (reach < boundary).sum()
                else:
                    assert (found_ids[row] == -1).all()
                assert got_tokens == expected_tokens, (k, distinct, row)
                expected_distances = np.array(expected_distances, dtype=np.float32)
                if name == "ivfpq":  # FAISS's own distances, by another route for a single query: see ATOL
                    np.testing.assert_allclose(got_distances, expected_distances, rtol=0, atol=ATOL)
                else:  # integer vectors: exact distances, the float64 ones
                    assert np.array_equal(got_distances, expected_distances), (k, distinct, row)
    # the k-th patch ties with patches left out, so the draw decides (and matches): measured in 246 of the 375
    # (k, query) cases (ivfpq: 183); more than 50 keeps the boundary case well covered
    assert boundary_draws > 50


def test_tokens_index_scans_exactly_its_probed_lists():
    """With nprobe < nlist, the selection of the tokens index is the brute force's over the patches of the lists
    whose centres are nearest to the query."""
    codebook, spec, grids, keys, slots, values, ids = database(seed=2, images=60, tokens=6)
    index = make_index("tokens", codebook, spec, grids, keys, slots, values, ids)
    store = index.backend
    store.set_nprobe(3)
    key_tokens, _, patch_ids = store.patches()  # in key order, keys in list order
    key_of_patch = np.cumsum(np.any(np.diff(key_tokens, axis=0, prepend=-2) != 0, axis=1)) - 1
    list_of_patch = np.repeat(np.arange(8), np.diff(store.list_start))[key_of_patch]
    patch_keys = vector_table(codebook).numpy()[key_tokens].reshape(len(key_tokens), -1)
    queries, _ = grid_queries(torch.randint(6, (2, 5, 5), generator=torch.Generator().manual_seed(3)), codebook, spec)
    queries = queries.flatten(0, 1)
    seeds = scan.query_seeds(queries.numpy(), np.zeros(len(queries), dtype=np.int64))
    centre = ((queries[:, None].double() - torch.from_numpy(store.centroids).double()[None]) ** 2).sum(-1)
    ranked = centre.sort(dim=1).values
    # the third and fourth nearest centres are far apart against float32 rounding of sums ~10 (~1e-6): the probed
    # lists are the same in float64 (measured gaps >= 1e-3)
    assert (ranked[:, 3] - ranked[:, 2] > 1e-4).all()
    for distinct in MODES:
        tokens, distances, _ = index.search_patches(queries, 20, distinct)
        for row in range(len(queries)):
            probed = np.isin(list_of_patch, centre[row].argsort()[:3].numpy())
            reach = ((patch_keys[probed] - queries[row].numpy().astype(np.float64)) ** 2).sum(1)
            expected = reference(reach, values[patch_ids[probed]], 20, distinct, int(seeds[row]))
            valid = tokens[row] >= 0
            got = (tokens[row][valid].tolist(), distances[row][valid].tolist())
            if distinct is None:
                pairs = sorted(zip(got[1], got[0], strict=True))
                got = ([t for _, t in pairs], [d for d, _ in pairs])
            assert got == expected, (distinct, row)


# ------------------------------------------------------------------------------------------------- ties


def tie_database():
    """Hand-made: the query's own key B holds 2 patches of token 3 (distance 0); the all-missing key A, at distance 2,
    holds 10 patches, tokens 0 x6, 1 x3, 2 x1; key C, at distance 14, 5 patches of token 4."""
    codebook = torch.tensor([[1.0, 1.0], [2.0, 1.0], [0.0, 3.0], [1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    spec = KeySpec("L", "1")
    b, a, c = [0, -1, -1, -1], [-1, -1, -1, -1], [2, 2, -1, -1]
    slots = np.array([b] * 2 + [a] * 10 + [c] * 5)
    values = np.array([3, 3] + [0] * 6 + [1] * 3 + [2] + [4] * 5)
    query = vector_table(codebook)[torch.tensor(b)].flatten()
    keys = vector_table(codebook).numpy()[slots].reshape(len(slots), -1)
    assert ((keys - query.numpy()) ** 2).sum(1).tolist() == [0] * 2 + [2] * 10 + [14] * 5
    return codebook, spec, slots, values, keys, query


@pytest.fixture(scope="module")
def tie_indexes():
    import faiss

    codebook, spec, slots, values, keys, query = tie_database()
    store = TokenStore.build(codebook, spec, keys[:1], slots, values, np.arange(len(values)), nprobe=1)
    flat = faiss.IndexIDMap2(faiss.IndexFlatL2(keys.shape[1]))
    flat.add_with_ids(keys, np.arange(len(values)))
    grids = np.concatenate([values, np.zeros(25 - len(values), np.int64)])[None]  # one 5 x 5 "image" of the ids
    return {"tokens": wrap(store, codebook, spec, "tokens", None),
            "flat": wrap(flat, codebook, spec, "flat", grids)}, query


# 2000 draws, one per salt. A token's share of the drawn tied patches (3 of 10, hypergeometric) has standard deviation
# sqrt(p (1 - p) (10 - 3) / ((10 - 1) 3 N)); a frequency p over N independent draws sqrt(p (1 - p) / N). Tolerances:
# 4 standard deviations, which a correct draw exceeds with probability 6e-5 (the salts are fixed: the test is
# deterministic; the bound says how unlucky a fixed set of seeds could be).
DRAWS = 2000


def within(observed: float, p: float, sd: float) -> bool:
    return abs(observed - p) <= 4 * sd


@pytest.mark.parametrize("name", ["tokens", "flat"])
def test_tied_patches_are_a_uniform_sample(tie_indexes, name):
    """k = 5: the 2 patches of key B, then 3 of the 10 tied patches of key A: each token's expected share of the drawn
    ones is its share of the tied patches (0.6, 0.3, 0.1), not the most frequent token first."""
    built, query = tie_indexes
    index = built[name]
    queries, salts = query.expand(DRAWS, -1).contiguous(), torch.arange(DRAWS)
    tokens, distances, ids = index.search_patches(queries, 5, None, salts)
    assert (tokens[:, :2] == 3).all() and (distances[:, :2] == 0).all() and (distances[:, 2:] == 2).all()
    assert all(len(set(row.tolist())) == 5 for row in ids)  # five distinct patches
    drawn = tokens[:, 2:]
    for token, p in ((0, 0.6), (1, 0.3), (2, 0.1)):
        sd = math.sqrt(p * (1 - p) * 7 / (9 * 3 * DRAWS))
        assert within(float((drawn == token).float().mean()), p, sd), token
    present = [(token, 1 - math.comb(10 - count, 3) / math.comb(10, 3)) for token, count in ((0, 6), (1, 3), (2, 1))]
    distinct, _ = index.search(queries, 5, "patches", salts)  # DAiD: a token is there if one of its patches is drawn
    assert (distinct[:, 0] == 3).all()
    for token, p in present:
        assert within(float((distinct == token).any(1).float().mean()), p, math.sqrt(p * (1 - p) / DRAWS)), token
    again = index.search_patches(queries[:7], 5, None, salts[:7])
    alone = index.search_patches(queries[5:6], 5, None, 5)
    assert all(torch.equal(x[:7], y) for x, y in zip((tokens, distances, ids), again, strict=True))  # reproducible
    assert torch.equal(alone[0][0], tokens[5])  # a query's draw does not depend on its batch
    assert not (tokens[:, 2:] == tokens[0, 2:]).all()  # other salts, other draws


@pytest.mark.parametrize("name", ["tokens", "flat"])
def test_tied_tokens_come_in_order_of_first_appearance(tie_indexes, name):
    """distinct_tokens, k = 3: token 3, then 2 of the tokens at distance 2 (patches 0 x6, 1 x3, 2 x1) in the order
    they first appear in a random permutation of those patches: P(0 then 1) = 0.6 * 3 / 4, ..."""
    built, query = tie_indexes
    tokens, distances = built[name].search(query.expand(DRAWS, -1).contiguous(), 3, "distinct_tokens",
                                           torch.arange(DRAWS))
    assert (tokens[:, 0] == 3).all() and (distances[:, 1:] == 2).all()
    weights = {0: 6, 1: 3, 2: 1}
    pairs = [tuple(row) for row in tokens[:, 1:].tolist()]
    for first, second in ((0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)):
        p = weights[first] / 10 * weights[second] / (10 - weights[first])
        assert within(pairs.count((first, second)) / DRAWS, p, math.sqrt(p * (1 - p) / DRAWS)), (first, second)


def test_index_types_draw_the_same_patches():
    """Seeds come from the query and the salt: the tokens and flat indexes, which find the same tied patches, draw the
    same tokens."""
    codebook, spec, grids, keys, slots, values, ids = database(seed=4)
    built = {name: make_index(name, codebook, spec, grids, keys, slots, values, ids) for name in ("tokens", "flat")}
    queries, _ = grid_queries(torch.randint(5, (2, 5, 5), generator=torch.Generator().manual_seed(5)), codebook, spec)
    queries = queries.flatten(0, 1)
    for distinct in MODES:
        a, b = ([sorted(zip(*row, strict=True)) if distinct is None else list(zip(*row, strict=True))
                 for row in zip(*(x.tolist() for x in built[name].search(queries, 9, distinct, 7)), strict=True)]
                for name in ("tokens", "flat"))  # (token, distance) per row; patches of one distance: any order
        assert a == b, distinct
