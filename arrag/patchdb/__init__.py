"""The patch-level retrieval database of AR-RAG (§3.1) and its index.

For DAiD, FAiD and analyses (details in each module):

    from arrag.patchdb import Fingerprint, KeySpec, PatchIndex

    index = PatchIndex.load(path, expected=Fingerprint.expected(codebook, grid, KeySpec("L", "1")))
    queries, usable = index.queries(tokens_so_far [B, t], step)      # [B, D] float32, [B] bool
    queries, usable = index.grid_queries(token_grids [B, h, w])      # [B, h * w, D], [h * w] (teacher forcing)
    tokens, distances = index.search(queries, k, distinct=None)      # [B, k] long (-1: none), [B, k] squared L2

Modules: `neighbourhood` (L / O keys, hops, edge policy, queries), `sources` (image sources and leakage
guards), `encode` (images -> shard files), `token_index` (exact search over token-tuple keys), `scan` (what a
search returns: the k nearest patches, their distinct tokens, or the k nearest distinct tokens; seeded ties),
`index` (`PatchIndex`), `build` (train / add / merge), `fingerprint`, `analysis` (Figure 6).
"""

from arrag.patchdb.fingerprint import Fingerprint, FingerprintMismatch
from arrag.patchdb.index import PatchIndex
from arrag.patchdb.neighbourhood import KeySpec, grid_queries, query_vectors

__all__ = ["Fingerprint", "FingerprintMismatch", "KeySpec", "PatchIndex", "grid_queries", "query_vectors"]
