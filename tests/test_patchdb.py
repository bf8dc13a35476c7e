"""Patch database keys, queries and the index types: hand-made grids, brute force, -1, nprobe, fingerprints."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arrag.patchdb.fingerprint import Fingerprint, FingerprintMismatch
from arrag.patchdb.index import PatchIndex, set_nprobe
from arrag.patchdb.neighbourhood import (
    MISSING,
    KeySpec,
    codebook_keys,
    grid_queries,
    neighbours,
    query_vectors,
    usable_cells,
)
from arrag.patchdb.token_index import TokenStore, pack_codes, train_lists, unpack_codes

GRID3 = torch.arange(9).view(1, 3, 3)  # token = raster position
# Index distances against a float64 brute force over the same float32 vectors. FAISS's PQ tables, its flat search of
# fewer than 20 queries and the numba scan sum squared differences term by term: for up to 96 non-negative terms the
# relative error stays below ~(8 + 12) * 6e-8 ~ 1.2e-6 (measured <= 2.2e-7); rtol 1e-5 leaves 8x over that bound.
# atol 1e-6 covers distance 0, exact when computed by subtraction (measured), ~1e-7 per slot in |q|^2 + |k|^2 - 2 q.k.
DISTANCES = {"rtol": 1e-5, "atol": 1e-6}


def test_offsets_in_raster_order():
    assert KeySpec("L", "1").offsets == ((-1, -1), (-1, 0), (-1, 1), (0, -1))  # up-left, up, up-right, left
    assert KeySpec("O", "1").offsets == ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
    assert KeySpec("L", "12").slots == 12 and KeySpec("O", "12").slots == 24
    assert KeySpec("L", "2").slots == 8 and all(max(map(abs, o)) == 2 for o in KeySpec("L", "2").offsets)
    with pytest.raises(ValueError):
        KeySpec("L", "0")


def test_l_neighbourhoods_on_a_hand_made_grid():
    cells = neighbours(GRID3, KeySpec("L", "1"), -1)[0]  # [3, 3, 4]
    assert cells[0, 0].tolist() == [-1, -1, -1, -1]
    assert cells[1, 1].tolist() == [0, 1, 2, 3]
    assert cells[1, 2].tolist() == [1, 2, -1, 4]  # right edge: no up-right
    assert cells[2, 0].tolist() == [-1, 3, 4, -1]  # left edge: no up-left, no left
    two = neighbours(torch.arange(25).view(1, 5, 5), KeySpec("L", "12"), -1)[0]
    assert two[2, 2].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]


def test_o_neighbourhoods_on_a_hand_made_grid():
    cells = neighbours(GRID3, KeySpec("O", "1"), -1)[0]
    assert cells[1, 1].tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    assert cells[0, 0].tolist() == [-1, -1, -1, -1, 1, -1, 3, 4]
    assert cells[2, 2].tolist() == [4, 5, -1, 7, -1, -1, -1, -1]


def test_missing_neighbours_are_zero_vectors_and_skip_policy_cells():
    codebook = F.normalize(torch.randn(9, 8), dim=-1)
    keys = codebook_keys(GRID3, codebook, KeySpec("L", "1"))[0]  # [3, 3, 32]
    assert torch.equal(keys[0, 0], torch.zeros(32))
    assert torch.equal(keys[1, 2], torch.cat([codebook[1], codebook[2], torch.zeros(8), codebook[4]]))
    skip_l = usable_cells(4, KeySpec("L", "1", edge_policy="skip"))
    assert skip_l.nonzero().tolist() == [[r, c] for r in (1, 2, 3) for c in (1, 2)]  # official: no first row/edges
    assert usable_cells(4, KeySpec("O", "1", edge_policy="skip")).sum() == 4
    assert usable_cells(4, KeySpec("L", "1")).all()


@pytest.mark.parametrize("spec", [KeySpec("L", "1"), KeySpec("L", "12", edge_policy="skip"), KeySpec("O", "1")])
def test_generation_queries_equal_teacher_forcing_queries(spec):
    codebook = F.normalize(torch.randn(16, 8), dim=-1)
    tokens = torch.randint(16, (3, 5, 5))
    queries, usable = grid_queries(tokens, codebook, spec)
    flat = tokens.flatten(1)
    for step in range(25):
        seen = flat if spec.neighbourhood == "O" else flat[:, :step]
        query, ok = query_vectors(seen, step, 5, codebook, spec)
        assert torch.equal(query, queries[:, step]) and ok.tolist() == [bool(usable[step])] * 3
    partial, _ = query_vectors(flat[:, :7], 7, 5, codebook, KeySpec("O", "1"))  # O: not generated yet = zero
    assert torch.equal(partial[:, 4 * 8:], torch.zeros(3, 32))


def brute_force(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Squared L2 distances [B, P] in float64."""
    return ((queries[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)


def store_for(grids: torch.Tensor, codebook: torch.Tensor, spec: KeySpec, nlist: int = 4):
    """A token store over all lists (nprobe = nlist: exact search), its float keys, values and ids."""
    usable = usable_cells(grids.shape[1], spec).flatten()
    slots = neighbours(grids, spec, -1).flatten(1, 2)[:, usable].flatten(0, 1).numpy()
    values = grids.flatten(1)[:, usable].flatten().numpy()
    ids = (torch.arange(len(grids))[:, None] * grids.shape[1] ** 2 + torch.arange(grids.shape[1] ** 2)[usable])
    keys = codebook_keys(grids, codebook, spec).flatten(1, 2)[:, usable].flatten(0, 1).numpy()
    ids = ids.flatten().numpy()
    distinct = np.unique(keys, axis=0)
    centroids = train_lists(distinct, min(nlist, len(distinct)), 0)
    return TokenStore.build(codebook, spec, centroids, slots, values, ids, nprobe=nlist), keys, values, ids


@pytest.mark.parametrize("spec", [KeySpec("L", "1"), KeySpec("O", "1", edge_policy="skip"), KeySpec("L", "12")])
def test_token_index_equals_brute_force(spec):
    torch.manual_seed(0)
    codebook = F.normalize(torch.randn(24, 8), dim=-1)
    grids = torch.randint(6, (60, 6, 6)) * 4 % 24  # few tokens: many shared keys and ties
    store, keys, values, all_ids = store_for(grids, codebook, spec)
    assert len(store.codes) < len(keys) or spec.slots > 4
    queries, usable = grid_queries(torch.randint(24, (4, 6, 6)), codebook, spec)
    queries = queries[:, usable].flatten(0, 1)
    for k, rows in ((1, None), (10, None), (200, None), (len(keys) + 5, 3)):
        tokens, distances, ids = store.search(queries[:rows], k)
        exact = brute_force(keys, queries[:rows].numpy())
        reference = np.sort(exact, axis=1)[:, :k]
        found = distances.numpy()[:, :reference.shape[1]]
        np.testing.assert_allclose(found, reference, **DISTANCES)
        valid = ids.numpy() >= 0
        assert valid.sum(1).tolist() == [min(k, len(keys))] * len(exact)
        rows = np.searchsorted(all_ids, ids.numpy()[valid])  # the patches returned are at the distances returned
        np.testing.assert_allclose(distances.numpy()[valid], exact[np.nonzero(valid)[0], rows], **DISTANCES)
        assert np.array_equal(values[rows], tokens.numpy()[valid])
    tokens, distances, _ = store.search(queries, 12, "distinct_tokens")
    exact = brute_force(keys, queries.numpy())
    for b in range(len(queries)):
        best = {}
        for distance, token in sorted(zip(exact[b], values, strict=True)):
            best.setdefault(int(token), distance)
        expected = sorted(best.values())[:12]
        got = distances[b][tokens[b] >= 0].numpy()
        np.testing.assert_allclose(got, expected, **DISTANCES)
        assert len(set(tokens[b][tokens[b] >= 0].tolist())) == len(got)


def test_token_index_returns_the_patch_it_names():
    torch.manual_seed(1)
    codebook = F.normalize(torch.randn(32, 8), dim=-1)
    spec = KeySpec("L", "1")
    grids = torch.randint(32, (20, 4, 4))
    store, keys, values, _ = store_for(grids, codebook, spec)
    queries = torch.from_numpy(keys[::7])
    tokens, distances, ids = store.search(queries, 3)
    patch = ids.numpy()  # ids equal rows of `keys` here (every cell usable, images in order)
    np.testing.assert_allclose(distances.numpy(), np.take_along_axis(brute_force(keys, queries.numpy()), patch, 1),
                               **DISTANCES)
    assert np.array_equal(values[patch], tokens.numpy())
    assert (distances[:, 0] < 1e-6).all()  # a database patch's own neighbourhood: at distance 0 (see DISTANCES)


def test_token_codes_are_faiss_pq_codes():
    """Packed tokens equal FAISS's PQ encoding of the key vectors with the codebook (and the zero vector) as every
    sub-codebook: keys are stored as PQ codes whose distances are exact."""
    import faiss

    codebook = F.normalize(torch.randn(40, 8), dim=-1)
    store, _, _, _ = store_for(torch.randint(40, (6, 4, 4)), codebook, KeySpec("L", "1"))
    table = torch.cat([codebook, torch.zeros(1, 8)]).numpy()
    keys = unpack_codes(store.codes, 6, 4)
    assert np.array_equal(pack_codes(keys, 6), store.codes)
    vectors = np.ascontiguousarray(table[keys].reshape(len(keys), -1))
    quantizer = faiss.ProductQuantizer(32, 4, 6)
    sub_codebook = np.full((64, 8), 1e6, dtype=np.float32)  # entries 41 .. 63 unused: far from every vector
    sub_codebook[:41] = table
    faiss.copy_array_to_vector(np.tile(sub_codebook, (4, 1)).ravel(), quantizer.centroids)
    assert np.array_equal(quantizer.compute_codes(vectors), store.codes)


def test_every_key_is_in_the_list_of_its_nearest_centre():
    import faiss

    codebook = F.normalize(torch.randn(40, 8), dim=-1)
    store, _, _, _ = store_for(torch.randint(10, (30, 5, 5)), codebook, KeySpec("L", "1"), nlist=6)
    table = torch.cat([codebook, torch.zeros(1, 8)]).numpy()
    vectors = np.ascontiguousarray(table[unpack_codes(store.codes, 6, 4)].reshape(len(store.codes), -1))
    nearest = faiss.IndexFlatL2(32)
    nearest.add(store.centroids)
    lists = np.repeat(np.arange(6), np.diff(store.list_start))
    assert np.array_equal(nearest.search(vectors, 1)[1][:, 0], lists)


def test_minus_one_is_never_a_token():
    codebook = F.normalize(torch.randn(8, 8), dim=-1)
    store, keys, _, _ = store_for(torch.randint(8, (1, 2, 2)), codebook, KeySpec("L", "1"))
    tokens, distances, ids = store.search(torch.from_numpy(keys[:2]), 10)
    assert (tokens[:, 4:] == -1).all() and torch.isinf(distances[:, 4:]).all() and (ids[:, 4:] == -1).all()
    assert (tokens[:, :4] >= 0).all()


def faiss_index(kind: str, keys: np.ndarray, values: np.ndarray, codebook: torch.Tensor, spec: KeySpec):
    import faiss

    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatL2(keys.shape[1]))
    else:
        index = faiss.index_factory(keys.shape[1], "OPQ4,IVF16,PQ4x4")
        index.train(keys)
    index.add_with_ids(keys, np.arange(len(keys)))
    fingerprint = Fingerprint.expected(codebook, 4, spec, kind)
    return PatchIndex(fingerprint, codebook, index, values.reshape(-1, 16), np.array(["a"] * (len(keys) // 16)),
                      np.zeros(len(keys) // 16, np.uint8), ["src"])


def test_flat_equals_brute_force_and_nprobe_really_applies():
    rng = np.random.default_rng(0)
    codebook = F.normalize(torch.randn(64, 8), dim=-1)
    spec = KeySpec("L", "1")
    keys = rng.normal(size=(1600, 32)).astype(np.float32)
    values = rng.integers(0, 64, 1600)
    queries = torch.from_numpy(rng.normal(size=(50, 32)).astype(np.float32))
    flat = faiss_index("flat", keys, values, codebook, spec)
    tokens, distances = flat.search(queries, 10)
    exact = brute_force(keys, queries.numpy())
    order = np.argsort(exact, axis=1)[:, :11]
    nearest = np.take_along_axis(exact, order, 1)
    # FAISS's flat search of >= 20 queries computes |q|^2 + |k|^2 - 2 q.k in float32 (BLAS): for these 32-d Gaussian
    # vectors (|.|^2 ~ 32) that errs by ~eps * 64 * few ~ 1e-5 (measured 5e-6) against distances >= 19, inside
    # rtol 1e-4; the 11 nearest keys of every query are more than 1e-4 apart (measured >= 1.3e-3), so the top-10
    # order is not decided by rounding.
    assert (np.diff(nearest, axis=1) > 1e-4).all()
    np.testing.assert_allclose(distances.numpy(), nearest[:, :10], rtol=1e-4)
    assert np.array_equal(tokens.numpy(), values[order[:, :10]])
    ivf = faiss_index("ivfpq", keys, values, codebook, spec)
    import faiss

    ivf.nprobe = 1
    assert faiss.extract_index_ivf(ivf.backend).nprobe == 1 and ivf.nprobe == 1  # reaches the IVF inside OPQ
    narrow = ivf.search(queries, 50)[0]
    ivf.nprobe = 16
    wide = ivf.search(queries, 50)[0]
    assert not torch.equal(narrow, wide)
    set_nprobe(ivf.backend, 1)
    assert torch.equal(ivf.search(queries, 50)[0], narrow)
    few = ivf.search(queries, 1600)[0]  # nprobe 1 cannot fill 1600 results: the rest is -1, not token 0
    assert (few == -1).any() and ((few >= 0) | (few == -1)).all()
    unique_tokens, _ = flat.search(queries, 20, "distinct_tokens")
    for row in unique_tokens:
        valid = row[row >= 0].tolist()
        assert len(valid) == len(set(valid)) == 20


def test_fingerprint_mismatch_raises(tmp_path):
    codebook = F.normalize(torch.randn(16, 8), dim=-1)
    spec = KeySpec("L", "1")
    stored = Fingerprint.expected(codebook, 8, spec, "tokens")
    stored.check(Fingerprint.expected(codebook, 8, spec))
    with pytest.raises(FingerprintMismatch, match="codebook_sha256"):
        stored.check(Fingerprint.expected(codebook + 1e-3, 8, spec))
    with pytest.raises(FingerprintMismatch, match="hops"):
        stored.check(Fingerprint.expected(codebook, 8, KeySpec("L", "12")))
    with pytest.raises(FingerprintMismatch, match="grid"):
        stored.check(Fingerprint.expected(codebook, 24, spec))
    stored.write(tmp_path / "index.json")
    from arrag.patchdb.fingerprint import read_metadata

    assert read_metadata(tmp_path / "index.json")[0] == stored


@pytest.mark.parametrize("spec", [KeySpec("L", "1"), KeySpec("L", "12", edge_policy="skip"), KeySpec("O", "1")])
def test_generation_time_search_equals_searching_its_queries(spec):
    """The compiled generation-time search builds the queries `query_vectors` builds and salts them with the step:
    the same tokens, distances and tie draws as `search` of those queries."""
    torch.manual_seed(3)
    codebook = F.normalize(torch.randn(24, 8), dim=-1)
    store, *_ = store_for(torch.randint(6, (60, 6, 6)) * 4, codebook, spec, nlist=8)  # 6 tokens: many ties
    store.set_nprobe(3)
    generated = torch.randint(6, (5, 36)) * 4
    generated[1, ::4] = MISSING  # not generated yet (masked decoding): zero vectors
    for distinct in (None, "patches", "distinct_tokens"):
        for step in range(36):
            seen = generated if spec.neighbourhood == "O" else generated[:, :step]
            tokens, distances = store.search_at(seen, step, 6, 7, distinct)
            expected_tokens, expected_distances, _ = store.search(query_vectors(seen, step, 6, codebook, spec)[0], 7,
                                                                  distinct, salt=step)
            assert torch.equal(tokens, expected_tokens) and torch.equal(distances, expected_distances)
