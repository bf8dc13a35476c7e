"""The distinct-token search of the tokens index, compiled (numba): one pass over the runs of the probed lists.

A run is (key, value token); its distance to a query is its key's, the sum over the key's S slots of the squared
L2 distance between the query's slot vector and the slot's codebook vector (the zero vector for a missing
neighbour). Every token keeps its nearest run; the k nearest tokens come out ordered by distance, and equally
distant tokens by the number of patches at that distance (more first, as among the nearest patches the official
code deduplicates), then by token id.
A query probes the `nprobe` IVF lists whose centres are nearest to it (ties: the lower list number).

`arrag.patchdb.token_index.TokenStore` holds the arrays: centroids [L, S * d] float32; slot_vectors [V + 1, d]
float32 (row V: the zero vector); list_run_start [L + 1] int64, the first run of each list; run_slots [R, S]
uint16, each run's key tokens (V = missing); run_token [R] int64, each run's value token; run_counts [R] uint16,
its patches. This module is the loop over them, compiled once per machine (numba's cache) and run without the GIL,
so that a search can overlap a forward in another thread. At generation time the query is built here too, from the
tokens generated so far: at batch 1 on CPU a step of the Shapes backbone leaves the caches cold, and every
Python-level operation between forwards costs tens of microseconds.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _list_distances(query, centroids):
    """Squared L2 from query [S * d] to each list centre [L, S * d] -> [L] float32. Reassociated sums (so the
    loop vectorises): they only choose the lists to probe."""
    distances = np.empty(centroids.shape[0], dtype=np.float32)
    for number in range(centroids.shape[0]):
        total = np.float32(0.0)
        for j in range(query.shape[0]):
            diff = query[j] - centroids[number, j]
            total += diff * diff
        distances[number] = total
    return distances


@numba.njit(cache=True, nogil=True)
def _search_row(query, centroids, nprobe, slot_vectors, list_run_start, run_slots, run_token, run_counts, k, tokens,
                distances):
    """One query [S * d] -> its k nearest distinct tokens written into tokens [k] / distances [k]."""
    slots, side, dim, lists = run_slots.shape[1], slot_vectors.shape[0], slot_vectors.shape[1], centroids.shape[0]
    list_distances = _list_distances(query, centroids)
    probes = min(nprobe, lists)
    nearest = np.partition(list_distances, probes - 1)[probes - 1]
    table = np.empty((slots, side), dtype=np.float32)  # the query's distance to every slot vector, per slot
    for slot in range(slots):
        for entry in range(side):
            total = np.float32(0.0)
            for j in range(dim):
                diff = query[slot * dim + j] - slot_vectors[entry, j]
                total += diff * diff
            table[slot, entry] = total
    best = np.full(side - 1, np.inf, dtype=np.float32)
    patches = np.zeros(side - 1, dtype=np.int64)  # patches of each token at its best distance
    probed = 0
    for number in range(lists):
        if list_distances[number] > nearest or probed == probes:
            continue
        probed += 1
        for run in range(list_run_start[number], list_run_start[number + 1]):
            distance = np.float32(0.0)
            for slot in range(slots):
                distance += table[slot, run_slots[run, slot]]
            token = run_token[run]
            if distance < best[token]:
                best[token] = distance
                patches[token] = run_counts[run]
            elif distance == best[token]:
                patches[token] += run_counts[run]
    found = 0
    for token in range(side - 1):
        if best[token] < np.inf:
            found += 1
    if found == 0:
        return
    limit = np.inf  # with more tokens found than k, keep those up to the k-th distance
    if found > k:
        limit = np.partition(best, k - 1)[k - 1]
    candidates = np.empty(found, dtype=np.int64)
    count = 0
    for token in range(side - 1):  # ascending token ids: stable sorts keep that order among full ties
        if best[token] <= limit and best[token] < np.inf:
            candidates[count] = token
            count += 1
    candidates = candidates[:count]
    candidates = candidates[np.argsort(-patches[candidates], kind="mergesort")]
    candidates = candidates[np.argsort(best[candidates], kind="mergesort")]
    for rank in range(min(k, count)):
        tokens[rank] = candidates[rank]
        distances[rank] = best[candidates[rank]]


@numba.njit(cache=True, nogil=True)
def nearest_distinct(queries, centroids, nprobe, slot_vectors, list_run_start, run_slots, run_token, run_counts, k):
    """queries [B, S * d] float32 -> (tokens [B, k] int64, squared L2 [B, k] float32), -1 / inf past the tokens
    found."""
    tokens = np.full((queries.shape[0], k), -1, dtype=np.int64)
    distances = np.full((queries.shape[0], k), np.inf, dtype=np.float32)
    for row in range(queries.shape[0]):
        _search_row(queries[row], centroids, nprobe, slot_vectors, list_run_start, run_slots, run_token, run_counts,
                    k, tokens[row], distances[row])
    return tokens, distances


@numba.njit(cache=True, nogil=True)
def nearest_distinct_at(generated, step, grid, offsets, centroids, nprobe, slot_vectors, list_run_start, run_slots,
                        run_token, run_counts, k):
    """`nearest_distinct` of the generation-time queries of raster position `step` (`neighbourhood.query_vectors`):
    generated [B, t] int64 tokens so far (-1 = not generated); offsets [S, 2] int64, the key's (row, column)
    offsets. A neighbour outside the grid, at a position >= t, or -1 is the zero vector."""
    batch, known = generated.shape
    slots, side, dim = offsets.shape[0], slot_vectors.shape[0], slot_vectors.shape[1]
    tokens = np.full((batch, k), -1, dtype=np.int64)
    distances = np.full((batch, k), np.inf, dtype=np.float32)
    query = np.empty(slots * dim, dtype=np.float32)
    row_of, col_of = step // grid, step % grid
    for row in range(batch):
        for slot in range(slots):
            r, c = row_of + offsets[slot, 0], col_of + offsets[slot, 1]
            token = side - 1
            if 0 <= r < grid and 0 <= c < grid and r * grid + c < known and generated[row, r * grid + c] >= 0:
                token = generated[row, r * grid + c]
            for j in range(dim):
                query[slot * dim + j] = slot_vectors[token, j]
        _search_row(query, centroids, nprobe, slot_vectors, list_run_start, run_slots, run_token, run_counts, k,
                    tokens[row], distances[row])
    return tokens, distances
