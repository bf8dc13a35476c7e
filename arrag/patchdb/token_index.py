"""Codebook-space patch index whose keys are stored as token tuples (index type ``tokens``).

In the codebook key space a key is the concatenation of the codebook vectors of its S neighbour tokens, so it
is fully described by the token tuple (t_1 .. t_S), with t = V standing for a missing (zero-vector)
neighbour, and its squared L2 distance to a query q = (q_1 .. q_S) is a sum of per-slot terms

    dist(q, key) = sum_s ||q_s - c[t_s]||^2,

i.e. product quantisation whose sub-codebooks are the VQ codebook itself (plus the zero vector). So the PQ
codes are the tokens, lossless: distances are exact, not approximations. Many patches share a key, so only
distinct keys are indexed, in an IVF (k-means lists over the distinct keys' vectors) whose PQ has those fixed
sub-codebooks (FAISS IndexIVFPQ, by_residual off, ceil(log2(V + 1)) bits per slot). The only approximation is
IVF probing: a query visits `nprobe` lists (nprobe = nlist is exact search).

Stored arrays (sorted by list, key, run size (largest first, so that equally distant patches come most frequent
value first), value token, patch id):

    codes       [U, c]  uint8    distinct token tuples (V = missing neighbour) packed as FAISS PQ codes,
                                 c = ceil(S * ceil(log2(V + 1)) / 8) bytes (5 for Shapes, 8 for Janus-Pro, L1)
    list_start  [L + 1]          first key of each IVF list;  centroids [L, S * d] float32 the lists' centres
    run_tokens  [R]     uint16   value token of each run (the patches of one key with one token); bit 15 set
                                 on the first run of each key
    run_counts  [R]     uint16   patches in the run (long runs are split)
    patch_ids   [P]              global patch id (image index * grid ** 2 + raster position), for analysis

About c U + 4 R + 4 P bytes (U, R <= P); the FAISS index is rebuilt from them when loaded, without encoding
anything (its ids are key numbers: 8 more bytes per distinct key in memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from arrag.patchdb import scan
from arrag.patchdb.neighbourhood import KeySpec, vector_table

INF = float("inf")
FIRST_RUN = 1 << 15  # flag bit of run_tokens
MAX_RUN = (1 << 16) - 1


def index_dtype(limit: int) -> np.dtype:
    """The smallest unsigned dtype of an array of ids below `limit`."""
    return np.dtype(np.uint32) if limit < 2**32 else np.dtype(np.int64)


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size < 2**16 else np.dtype(np.int32)


def code_bits(codebook_size: int) -> int:
    """Bits per slot of a PQ code: tokens 0 .. V - 1 and V (missing)."""
    return max(1, int(np.ceil(np.log2(codebook_size + 1))))


def pack_codes(keys: np.ndarray, bits: int) -> np.ndarray:
    """Token tuples [n, S] -> FAISS PQ codes [n, ceil(S * bits / 8)] uint8 (little-endian bit strings)."""
    shifts = np.arange(bits, dtype=np.uint32)
    bitstring = ((keys.astype(np.uint32)[:, :, None] >> shifts) & 1).astype(np.uint8).reshape(len(keys), -1)
    return np.packbits(bitstring, axis=1, bitorder="little")


def unpack_codes(codes: np.ndarray, bits: int, slots: int) -> np.ndarray:
    """Inverse of `pack_codes`: [n, code bytes] uint8 -> token tuples [n, slots] int64."""
    bitstring = np.unpackbits(codes, axis=1, bitorder="little")[:, :slots * bits].reshape(len(codes), slots, bits)
    return (bitstring.astype(np.int64) << np.arange(bits)).sum(2)


def sub_codebook(codebook: torch.Tensor, bits: int) -> np.ndarray:
    """[2 ** bits, d]: the codebook, the zero vector (missing neighbour), then far-away unused entries."""
    table = np.full((2**bits, codebook.shape[1]), 1e6, dtype=np.float32)
    table[:len(codebook)] = codebook.numpy()
    table[len(codebook)] = 0.0
    return table


def train_lists(vectors: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """k-means centres [nlist, D] of key vectors (the IVF lists)."""
    import faiss

    kmeans = faiss.Kmeans(vectors.shape[1], nlist, niter=20, seed=seed, min_points_per_centroid=1)
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return kmeans.centroids


def most_frequent_first(keys: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Permutation of rows sorted by (key, token) that orders each key's runs by decreasing size (then token):
    equally distant patches are returned most frequent value first."""
    key_new = np.ones(len(keys), dtype=bool)
    key_new[1:] = keys[1:] != keys[:-1]
    new = key_new.copy()
    new[1:] |= tokens[1:] != tokens[:-1]
    first = np.flatnonzero(new)
    size = np.diff(np.append(first, len(keys)))
    runs = np.lexsort((tokens[first], -size, np.cumsum(key_new)[first]))  # keys keep their order
    offsets = np.repeat(first[runs] - np.concatenate([[0], np.cumsum(size[runs])[:-1]]), size[runs])
    return offsets + np.arange(len(keys))


@dataclass
class TokenStore:
    """Distinct token-tuple keys in an IVF, their runs and patches (layout in the module docstring)."""

    codebook: torch.Tensor  # [V, d] float32, the vectors keys and queries are made of
    spec: KeySpec
    codes: np.ndarray
    list_start: np.ndarray
    centroids: np.ndarray
    run_tokens: np.ndarray
    run_counts: np.ndarray
    patch_ids: np.ndarray
    nprobe: int = 16
    last_stats: dict = field(default_factory=dict)

    ARRAYS = ("codes", "list_start", "centroids", "run_tokens", "run_counts", "patch_ids")

    def __post_init__(self) -> None:
        self.codebook = self.codebook.detach().float().cpu()
        first_run = (self.run_tokens & FIRST_RUN) != 0
        self._run_token = torch.from_numpy((self.run_tokens & ~np.uint16(FIRST_RUN)).astype(np.int64))
        self._key_start = torch.from_numpy(np.append(np.flatnonzero(first_run), len(self.run_tokens)))
        self._run_start = torch.from_numpy(np.concatenate([[0], np.cumsum(self.run_counts, dtype=np.int64)]))
        self._patch_ids = torch.from_numpy(self.patch_ids.astype(np.int64))
        # the distinct-token scan (`arrag.patchdb.scan`) reads each run's key tokens, run-major [R, S]
        keys = unpack_codes(self.codes, code_bits(self.codebook.shape[0]), self.spec.slots)
        key_of_run = np.repeat(np.arange(len(keys)), np.diff(self._key_start.numpy()))
        run_slots = np.ascontiguousarray(keys[key_of_run].astype(np.uint16))
        list_run_start = self._key_start.numpy()[self.list_start.astype(np.int64)]
        self._scan = (vector_table(self.codebook).numpy(), list_run_start, run_slots, self._run_token.numpy(),
                      self.run_counts)
        self._offsets = np.array(self.spec.offsets, dtype=np.int64).reshape(-1, 2)
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        self._index = self._faiss_index()

    def _faiss_index(self):
        """IndexIVFPQ over the distinct keys: lists from `list_start`, codes packed from the tokens."""
        import faiss

        dimension, slots, bits = self.centroids.shape[1], self.spec.slots, code_bits(self.codebook.shape[0])
        quantizer = faiss.IndexFlatL2(dimension)
        quantizer.add(np.ascontiguousarray(self.centroids, dtype=np.float32))
        index = faiss.IndexIVFPQ(quantizer, dimension, len(self.centroids), slots, bits)
        if index.code_size != self.codes.shape[1]:
            raise ValueError(f"codes of {self.codes.shape[1]} bytes, expected {index.code_size}")
        index.by_residual = False
        faiss.copy_array_to_vector(np.tile(sub_codebook(self.codebook, bits), (slots, 1)).ravel(), index.pq.centroids)
        index.is_trained = True
        index.own_fields = False
        self._quantizer = quantizer  # keep it alive with the index
        codes = np.ascontiguousarray(self.codes)
        ids = np.arange(len(codes), dtype=np.int64)
        bounds = self.list_start.astype(np.int64)
        for number in np.flatnonzero(np.diff(bounds)):
            lo, hi = bounds[number], bounds[number + 1]
            index.invlists.add_entries(int(number), int(hi - lo), faiss.swig_ptr(ids[lo:hi]),
                                       faiss.swig_ptr(np.ascontiguousarray(codes[lo:hi])))
        index.ntotal = len(codes)
        index.nprobe = min(self.nprobe, len(self.centroids))
        return index

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, codebook: torch.Tensor, spec: KeySpec, centroids: np.ndarray, slot_tokens: np.ndarray,
              tokens: np.ndarray, patch_ids: np.ndarray, nprobe: int = 16) -> TokenStore:
        """From per-patch arrays: neighbour tokens [P, S] (-1 = missing), value tokens [P], global ids [P]; the
        distinct keys go to the nearest of `centroids` [L, S * d] (train them with `train_lists`)."""
        import faiss

        size = codebook.shape[0]
        if size >= FIRST_RUN:
            raise ValueError(f"the tokens index stores tokens in 15 bits; codebook size {size} is too large")
        bits = code_bits(size)
        codes = pack_codes(np.where(slot_tokens < 0, size, slot_tokens), bits)  # [P, c]
        if codes.shape[1] <= 8:  # distinct keys by one sort of 64-bit integers
            wide = np.zeros((len(codes), 8), dtype=np.uint8)
            wide[:, :codes.shape[1]] = codes
            _, first, inverse = np.unique(wide.view("<u8").ravel(), return_index=True, return_inverse=True)
            codes = codes[first]
        else:
            codes, inverse = np.unique(codes, axis=0, return_inverse=True)
        distinct = unpack_codes(codes, bits, spec.slots)
        table = np.concatenate([codebook.numpy(), np.zeros((1, codebook.shape[1]), np.float32)])
        quantizer = faiss.IndexFlatL2(centroids.shape[1])
        quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
        lists = np.zeros(len(distinct), dtype=np.int64)
        for start in range(0, len(distinct), 1 << 18):
            part = distinct[start:start + (1 << 18)]
            lists[start:start + len(part)] = quantizer.search(table[part].reshape(len(part), -1), 1)[1][:, 0]
        order = np.lexsort((patch_ids, tokens, inverse.ravel(), lists[inverse.ravel()]))
        order = order[most_frequent_first(inverse.ravel()[order], np.asarray(tokens)[order])]
        key_of, tokens, patch_ids = inverse.ravel()[order], np.asarray(tokens)[order], np.asarray(patch_ids)[order]
        count = len(tokens)
        key_new = np.ones(count, dtype=bool)
        key_new[1:] = key_of[1:] != key_of[:-1]
        run_new = key_new.copy()
        run_new[1:] |= tokens[1:] != tokens[:-1]
        run_new[np.arange(count) % MAX_RUN == 0] = True  # no run longer than uint16 (split runs stay exact)
        run_first = np.flatnonzero(run_new)
        key_first = np.flatnonzero(key_new)
        key_rows = key_of[key_first]
        run_tokens = tokens[run_first].astype(np.uint16) | np.where(key_new[run_first], FIRST_RUN, 0).astype(np.uint16)
        list_start = np.searchsorted(lists[key_rows], np.arange(len(centroids) + 1))
        return cls(codebook=codebook, spec=spec, codes=codes[key_rows],
                   list_start=list_start.astype(np.int64),
                   centroids=np.asarray(centroids, dtype=np.float32), run_tokens=run_tokens,
                   run_counts=np.diff(np.append(run_first, count)).astype(np.uint16),
                   patch_ids=patch_ids.astype(index_dtype(int(patch_ids.max(initial=0)) + 1)), nprobe=nprobe)

    def patches(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Back to per-patch arrays (neighbour tokens [P, S] with -1, value tokens [P], patch ids [P])."""
        key_sizes = (self._run_start[self._key_start[1:]] - self._run_start[self._key_start[:-1]]).numpy()
        keys = unpack_codes(self.codes, code_bits(self.codebook.shape[0]), self.spec.slots)
        keys[keys == self.codebook.shape[0]] = -1
        return (np.repeat(keys, key_sizes, axis=0), np.repeat(self._run_token.numpy(), self.run_counts),
                self.patch_ids.astype(np.int64))

    @classmethod
    def merge(cls, stores: list[TokenStore]) -> TokenStore:
        """One store holding the patches of all `stores` (same lists; patch ids already global and distinct)."""
        parts = [store.patches() for store in stores]
        first = stores[0]
        return cls.build(first.codebook, first.spec, first.centroids,
                         *(np.concatenate(p) for p in zip(*parts, strict=True)), nprobe=first.nprobe)

    @property
    def size(self) -> int:
        return len(self.patch_ids)

    def nbytes(self) -> int:
        return sum(np.asarray(getattr(self, name)).nbytes for name in self.ARRAYS)

    def set_nprobe(self, nprobe: int) -> None:
        self.nprobe = nprobe
        self._index.nprobe = min(nprobe, len(self.centroids))

    # ------------------------------------------------------------------------------------------- search
    def search(self, queries: torch.Tensor, k: int, unique: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k: queries [B, S * d] -> (tokens [B, k] long, squared L2 distances [B, k] float32, patch ids
        [B, k] long); missing results are token -1, distance inf, id -1. With `unique`, the k nearest distinct
        tokens (each at its nearest patch; patch ids are then -1). Exact when nprobe equals the list count."""
        queries = torch.as_tensor(queries, dtype=torch.float32).cpu()
        if unique:
            return (*self._nearest_distinct(queries, k), torch.full((len(queries), k), -1, dtype=torch.long))
        return self._expand(*self._keys(np.ascontiguousarray(queries.numpy()), k), k)

    def _keys(self, queries: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest distinct keys: (squared L2 [B, k], key ids [B, k], -1 = none)."""
        found = min(k, len(self.codes))
        distances = torch.full((len(queries), k), INF)
        keys = torch.full((len(queries), k), -1, dtype=torch.long)
        if found and len(queries):
            d, i = self._index.search(queries, found)
            keys[:, :found] = torch.from_numpy(i)
            distances[:, :found] = torch.where(keys[:, :found] >= 0, torch.from_numpy(d), INF)
        return distances, keys

    def _expand(self, key_distances: torch.Tensor, keys: torch.Tensor, k: int):
        """The first k patches of the ranked keys: (tokens, distances, patch ids), each [B, k]."""
        valid = keys >= 0
        key = keys.clamp_min(0)
        first = self._run_start[self._key_start[key]]
        sizes = torch.where(valid, self._run_start[self._key_start[key + 1]] - first, 0)
        ends = sizes.cumsum(1)
        slot = torch.arange(k).expand(len(keys), k).contiguous()
        owner = torch.searchsorted(ends, slot, right=True).clamp_max(keys.shape[1] - 1)
        found = slot < ends[:, -1:]
        patch = (first.gather(1, owner) + slot - (ends - sizes).gather(1, owner)).clamp(0, max(0, self.size - 1))
        run = torch.searchsorted(self._run_start, patch, right=True) - 1
        tokens = torch.where(found, self._run_token[run.clamp_max(len(self._run_token) - 1)], -1)
        distances = torch.where(found, key_distances.gather(1, owner), INF)
        return tokens, distances, torch.where(found, self._patch_ids[patch], -1)

    def _nearest_distinct(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest distinct tokens among the patches of each query's `nprobe` nearest lists: queries
        [B, S * d] -> (tokens [B, k] long, squared L2 [B, k] float32; -1 / inf past the tokens found), ordered by
        distance, ties: more patches at that distance first, then the lower token id. Every run (key, token) of the
        probed lists is scored (`arrag.patchdb.scan`): a run's distance is its key's, the same sum of per-slot
        distances FAISS's PQ scan computes."""
        if len(self.codes) == 0:
            return torch.full((len(queries), k), -1, dtype=torch.long), torch.full((len(queries), k), INF)
        queries = np.ascontiguousarray(queries.numpy())
        found = scan.nearest_distinct(queries, self.centroids, self.nprobe, *self._scan, k)
        return torch.from_numpy(found[0]), torch.from_numpy(found[1])

    def nearest_distinct_at(self, generated: torch.Tensor, step: int, grid: int, k: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generation time: `search(query_vectors(generated, step, grid, ...), k, unique=True)` in one compiled
        call, the queries built from the tokens generated so far [B, t] (see `arrag.patchdb.scan`)."""
        if len(self.codes) == 0:
            return torch.full((len(generated), k), -1, dtype=torch.long), torch.full((len(generated), k), INF)
        found = scan.nearest_distinct_at(generated.cpu().numpy(), step, grid, self._offsets, self.centroids,
                                         self.nprobe, *self._scan, k)
        return torch.from_numpy(found[0]), torch.from_numpy(found[1])
