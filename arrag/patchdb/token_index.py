"""Codebook-space patch index whose keys are stored as token tuples (index type ``tokens``).

In the codebook key space a key is the concatenation of the codebook vectors of its S neighbour tokens, so it
is fully described by the token tuple (t_1 .. t_S), with t = V standing for a missing (zero-vector)
neighbour, and its squared L2 distance to a query q = (q_1 .. q_S) is a sum of per-slot terms

    dist(q, key) = sum_s ||q_s - c[t_s]||^2,

i.e. product quantisation whose sub-codebooks are the VQ codebook itself (plus the zero vector). So the PQ
codes are the tokens, lossless: distances are exact, not approximations. Many patches share a key, so only
distinct keys are indexed, in an IVF (k-means lists over the distinct keys' vectors); a query's scan
(`arrag.patchdb.scan`, compiled) scores every key of its `nprobe` nearest lists from a table of its per-slot
distances. The only approximation is IVF probing (nprobe = nlist is exact search). A key's patches are counted
per value token ("runs"), which makes the k nearest patches exact without listing patches, and leaves the ties
at the k-th patch to the scan's seeded draw.

Stored arrays (sorted by list, key, value token, patch id):

    codes       [U, c]  uint8    distinct token tuples (V = missing neighbour) packed as FAISS PQ codes are,
                                 c = ceil(S * ceil(log2(V + 1)) / 8) bytes (5 for Shapes, 8 for Janus-Pro, L1)
    list_start  [L + 1]          first key of each IVF list;  centroids [L, S * d] float32 the lists' centres
    run_tokens  [R]     uint16   value token of each run (the patches of one key with one token); bit 15 set
                                 on the first run of each key
    run_counts  [R]     uint16   patches in the run (long runs are split)
    patch_ids   [P]              global patch id (image index * grid ** 2 + raster position), for analysis

About c U + 4 R + 4 P bytes (U, R <= P); loading adds the arrays the scan reads (2 S + 16 bytes per key, 16 per
run and 8 per patch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from arrag.patchdb import scan
from arrag.patchdb.neighbourhood import KeySpec, vector_table

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


def train_lists(vectors: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """k-means centres [nlist, D] of key vectors (the IVF lists)."""
    import faiss

    kmeans = faiss.Kmeans(vectors.shape[1], nlist, niter=20, seed=seed, min_points_per_centroid=1)
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return kmeans.centroids


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

    ARRAYS = ("codes", "list_start", "centroids", "run_tokens", "run_counts", "patch_ids")

    def __post_init__(self) -> None:
        self.codebook = self.codebook.detach().float().cpu()
        first_run = (self.run_tokens & FIRST_RUN) != 0
        run_token = (self.run_tokens & ~np.uint16(FIRST_RUN)).astype(np.int64)
        key_run_start = np.append(np.flatnonzero(first_run), len(self.run_tokens)).astype(np.int64)
        run_patch_start = np.concatenate([[0], np.cumsum(self.run_counts, dtype=np.int64)])
        key_slots = unpack_codes(self.codes, code_bits(self.codebook.shape[0]), self.spec.slots).astype(np.uint16)
        # the arrays `arrag.patchdb.scan` reads after the query's, in its order
        self._scan = (vector_table(self.codebook).numpy(), self.list_start.astype(np.int64),
                      np.ascontiguousarray(key_slots), np.diff(run_patch_start[key_run_start]), key_run_start,
                      run_token, run_patch_start, self.patch_ids.astype(np.int64))
        self._offsets = np.array(self.spec.offsets, dtype=np.int64).reshape(-1, 2)
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        self.set_nprobe(self.nprobe)

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
        _, _, key_slots, key_sizes, _, run_token, _, patch_ids = self._scan
        keys = key_slots.astype(np.int64)
        keys[keys == self.codebook.shape[0]] = -1
        return np.repeat(keys, key_sizes, axis=0), np.repeat(run_token, self.run_counts), patch_ids

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
        """Lists a query probes, at most all of them (what a search uses and a record reports)."""
        if nprobe < 1:
            raise ValueError(f"nprobe must be at least 1, got {nprobe}")
        self.nprobe = min(nprobe, len(self.centroids))

    # ------------------------------------------------------------------------------------------- search
    def search(self, queries: torch.Tensor, k: int, distinct: str | None = None, salt: int | torch.Tensor = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """queries [B, S * d] -> (tokens [B, k] long, squared L2 distances [B, k] float32, patch ids [B, k] long;
        -1 / inf / -1 past the results, ids -1 unless `distinct` is None): the selection `distinct` (None, "patches"
        or "distinct_tokens", see `arrag.patchdb.scan`) among the patches of each query's `nprobe` nearest lists,
        ties drawn with seeds from the query and `salt` (int or [B]). Exact when nprobe equals the list count."""
        queries = np.ascontiguousarray(torch.as_tensor(queries, dtype=torch.float32).cpu().numpy())
        salts = np.broadcast_to(torch.as_tensor(salt, dtype=torch.long).cpu().numpy(), (len(queries),)).copy()
        found = scan.search(queries, salts, self.centroids, self.nprobe, *self._scan, k, scan.MODES[distinct])
        return tuple(torch.from_numpy(x) for x in found)

    def search_at(self, generated: torch.Tensor, step: int, grid: int, k: int, distinct: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generation time: `search(query_vectors(generated, step, grid, ...), k, distinct, salt=step)[:2]` in one
        compiled call, the queries built from the tokens generated so far [B, t] (see `arrag.patchdb.scan`)."""
        found = scan.search_at(generated.cpu().long().numpy(), step, grid, self._offsets, self.centroids, self.nprobe,
                               *self._scan, k, scan.MODES[distinct])
        return torch.from_numpy(found[0]), torch.from_numpy(found[1])
