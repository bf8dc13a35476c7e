"""What a patch-index search returns, compiled (numba): the selections of every index type, and the tokens index's
scan of its probed lists.

Selections (`MODES`; the `distinct` argument of `arrag.patchdb.index.PatchIndex.search`):

* None: the k nearest patches, duplicates kept (FAiD; the official ``search(..., unique=False)``), ordered by
  distance; with their patch ids.
* "patches": one entry per distinct token among the k nearest patches, at its nearest patch's distance, ordered by
  distance, then token id (DAiD; the official retriever takes the k nearest patches and keeps the first occurrence
  of each token, and the paper's Eq. 2-3 run over the top-k patches): at most k tokens, usually far fewer.
* "distinct_tokens" (ours, not the official method): the k nearest distinct tokens, each at its nearest patch,
  i.e. the search goes on past the k-th patch until k distinct tokens appear.

Ties. The patches at the k-th patch's distance ("tied") that fit are a uniform sample without replacement of all of
them, so that each token's expected share of the drawn patches is its share of the tied patches (no preference for
the most frequent token). With "distinct_tokens", the tokens whose nearest distance equals the k-th token's come in
the order of their first appearance in a uniformly random permutation of their patches at that distance (each next
token drawn with probability proportional to its patches among those left). Draws are seeded from the query itself
(its float32 bytes) and a salt (generation: the decode step), never from a batch-level generator, so a result does
not depend on the batch, micro-batch or shard it is computed in, and index types that find the same patches at the
same distances draw the same ones.

Input of a selection: "groups" of patches at one distance, each made of "runs" (its patches of one token): for the
tokens index a group is a distinct key and a run its patches of one value token (`token_index`); for the FAISS
types a group is one patch FAISS found. group_run_start [G + 1] is the first run of each group, run_token [R] int64
each run's token, run_patch_start [R + 1] int64 the first patch of each run, patch_ids [P] int64 the patches' ids.

The tokens index's arrays (`arrag.patchdb.token_index.TokenStore`): centroids [L, S * d] float32; slot_vectors
[V + 1, d] float32 (row V: the zero vector); list_key_start [L + 1] int64, the first key of each list; key_slots
[U, S] uint16, each key's tokens (V = missing); key_sizes [U] int64, its patches; and the group / run arrays above
over the keys. A key's distance to
a query is the sum over its S slots of the squared L2 distance between the query's slot vector and the slot's
codebook vector. A query probes the `nprobe` lists whose centres are nearest to it (ties: the lower list number).
Compiled once per machine (numba's cache) and run without the GIL, so that a search can overlap a forward in another
thread. At generation time the query is built here too, from the tokens generated so far: at batch 1 on CPU a step
of the Shapes backbone leaves the caches cold, and every Python-level operation between forwards costs tens of
microseconds.
"""

from __future__ import annotations

import numba
import numpy as np

PATCHES, PATCH_TOKENS, DISTINCT_TOKENS = 0, 1, 2
MODES = {None: PATCHES, "patches": PATCH_TOKENS, "distinct_tokens": DISTINCT_TOKENS}


@numba.njit(cache=True, nogil=True)
def query_seed(query, salt):
    """A seed in [0, 2 ** 32) from a query's float32 values [D] (contiguous) and an integer salt: FNV-1a over the
    bytes' 32-bit words and the salt, then splitmix64's finaliser."""
    state = np.uint64(14695981039346656037)
    prime = np.uint64(1099511628211)
    for word in query.view(np.uint32):
        state = (state ^ np.uint64(word)) * prime
    state = (state ^ np.uint64(salt & 0xFFFFFFFFFFFF)) * prime
    state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return np.int64((state ^ (state >> np.uint64(31))) >> np.uint64(32))


@numba.njit(cache=True, nogil=True)
def query_seeds(queries, salts):
    """`query_seed` of each row: queries [B, D] float32, salts [B] int64 -> [B] int64."""
    seeds = np.empty(queries.shape[0], dtype=np.int64)
    for row in range(queries.shape[0]):
        seeds[row] = query_seed(queries[row], salts[row])
    return seeds


@numba.njit(cache=True, nogil=True)
def draw_patches(counts, quota, seed):
    """Of `quota` patches drawn uniformly without replacement from tied patches, how many hold each token: counts [n]
    int64, the tied patches of each token in ascending token order -> [n] int64 summing to min(quota, total).
    Floyd's algorithm draws the smaller of the taken and the left-out sets, as positions in that order."""
    total = counts.sum()
    if quota >= total:
        return counts.copy()
    np.random.seed(np.uint32(seed))
    size = min(quota, total - quota)
    chosen = set()
    for j in range(total - size, total):
        pick = np.random.randint(0, j + 1)
        chosen.add(j if pick in chosen else pick)
    ends = np.cumsum(counts)
    hits = np.zeros(len(counts), dtype=np.int64)
    for position in chosen:
        hits[np.searchsorted(ends, position, side="right")] += 1
    return hits if size == quota else counts - hits


@numba.njit(cache=True, nogil=True)
def draw_order(weights, seed):
    """The order [n] of tokens in which they first appear in a uniformly random permutation of their patches, weights
    [n] int64 (>= 1) their patch counts: each token's first appearance is an exponential time of rate its weight."""
    np.random.seed(np.uint32(seed))
    times = np.empty(len(weights))
    for i in range(len(weights)):
        times[i] = -np.log(1.0 - np.random.random()) / weights[i]
    return np.argsort(times)


@numba.njit(cache=True, nogil=True)
def kth_smallest(values, k):
    """The k-th smallest (0-based) of values [n] (Wirth's selection on a copy; faster than numba's np.partition)."""
    a = values.copy()
    lo, hi = 0, len(a) - 1
    while lo < hi:
        pivot, i, j = a[k], lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while pivot < a[j]:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if j < k:
            lo = i
        if k < i:
            hi = j
    return a[k]


@numba.njit(cache=True, nogil=True)
def kth_patch(distances, sizes, groups, k):
    """Reorders distances [n], sizes [n] and groups [n] alike (entry i: sizes[i] patches at distances[i]) into those
    nearer than the k-th nearest patch, those at its distance, those farther; returns (its distance, the nearer
    entries' end, the tied entries' end, the nearer patches). Needs 1 <= k <= sum(sizes). Three-way quickselect:
    expected O(n)."""
    lo, hi, below = 0, len(distances), 0
    while True:
        a, b, c = distances[lo], distances[(lo + hi) // 2], distances[hi - 1]
        pivot = max(min(a, b), min(max(a, b), c))
        lt, i, gt, less, equal = lo, lo, hi, 0, 0
        while i < gt:
            if distances[i] < pivot:
                distances[i], distances[lt] = distances[lt], distances[i]
                sizes[i], sizes[lt] = sizes[lt], sizes[i]
                groups[i], groups[lt] = groups[lt], groups[i]
                less += sizes[lt]
                lt += 1
                i += 1
            elif distances[i] > pivot:
                gt -= 1
                distances[i], distances[gt] = distances[gt], distances[i]
                sizes[i], sizes[gt] = sizes[gt], sizes[i]
                groups[i], groups[gt] = groups[gt], groups[i]
            else:
                equal += sizes[i]
                i += 1
        if k <= below + less:
            hi = lt
        elif k <= below + less + equal:
            return pivot, lt, gt, below + less
        else:
            below += less + equal
            lo = gt


@numba.njit(cache=True, nogil=True)
def _by_distance(found, best):
    """Tokens found [n] ordered by best[token], then token id."""
    found = np.sort(found)
    return found[np.argsort(best[found], kind="mergesort")]


@numba.njit(cache=True, nogil=True)
def select(group_distance, group_sizes, groups, group_run_start, run_token, run_patch_start, patch_ids, k, mode,
           seed, side, tokens, distances, ids):
    """One query's selection (`MODES`) among candidate groups [n] (ids into group_run_start) at group_distance [n]
    float32 with group_sizes [n] patches (reordered in place), written into tokens [k], distances [k], ids [k] (left
    as they are past the results; ids only for PATCHES); tokens are below `side`. Returns the boundary: the k-th
    patch's distance (PATCHES, PATCH_TOKENS) or the k-th token's (DISTINCT_TOKENS), inf when the groups hold fewer. A
    caller that saw only the nearest groups has every one the selection needs once it saw one beyond the boundary."""
    n = len(groups)
    if mode == DISTINCT_TOKENS:
        best = np.full(side, np.inf, dtype=np.float32)
        at_best = np.zeros(side, dtype=np.int64)  # patches of each token at its nearest distance
        found, count = np.empty(side, dtype=np.int64), 0
        for g in range(n):
            distance = group_distance[g]
            for run in range(group_run_start[groups[g]], group_run_start[groups[g] + 1]):
                token, size = run_token[run], run_patch_start[run + 1] - run_patch_start[run]
                if distance < best[token]:
                    if best[token] == np.inf:
                        found[count] = token
                        count += 1
                    best[token], at_best[token] = distance, size
                elif distance == best[token]:
                    at_best[token] += size
        found = found[:count]
        boundary = np.inf
        if count >= k:
            boundary = kth_smallest(best[found], k - 1)
        nearer = _by_distance(found[best[found] < boundary], best)
        tied = np.sort(found[best[found] == boundary])
        quota = k - len(nearer)
        if quota < len(tied):
            tied = tied[draw_order(at_best[tied], seed)[:quota]]
        chosen = np.concatenate((nearer, tied))
        for rank in range(min(k, len(chosen))):
            tokens[rank], distances[rank] = chosen[rank], best[chosen[rank]]
        return boundary
    boundary, nearer_end, tied_end, quota = np.inf, n, n, 0
    if n and group_sizes.sum() >= k:
        candidates = n  # the k nearest groups hold >= k patches: move the groups up to their distance to the front
        if n > k:
            cut, candidates = kth_smallest(group_distance, k - 1), 0
            for g in range(n):
                if group_distance[g] <= cut:
                    group_distance[g], group_distance[candidates] = group_distance[candidates], group_distance[g]
                    group_sizes[g], group_sizes[candidates] = group_sizes[candidates], group_sizes[g]
                    groups[g], groups[candidates] = groups[candidates], groups[g]
                    candidates += 1
        boundary, nearer_end, tied_end, nearer_patches = kth_patch(group_distance[:candidates],
                                                                   group_sizes[:candidates], groups[:candidates], k)
        quota = k - nearer_patches
    tied_runs = 0  # the tied patches' tokens in ascending order, and how many of each the draw takes
    for g in range(nearer_end, tied_end):
        tied_runs += group_run_start[groups[g] + 1] - group_run_start[groups[g]]
    run_tokens, run_sizes, filled = np.empty(tied_runs, dtype=np.int64), np.empty(tied_runs, dtype=np.int64), 0
    for g in range(nearer_end, tied_end):
        for run in range(group_run_start[groups[g]], group_run_start[groups[g] + 1]):
            run_tokens[filled], run_sizes[filled] = run_token[run], run_patch_start[run + 1] - run_patch_start[run]
            filled += 1
    order = np.argsort(run_tokens, kind="mergesort")
    tied_tokens, tied_counts, distinct = np.empty(tied_runs, dtype=np.int64), np.zeros(tied_runs, dtype=np.int64), 0
    for j in order:
        if distinct == 0 or tied_tokens[distinct - 1] != run_tokens[j]:
            tied_tokens[distinct] = run_tokens[j]
            distinct += 1
        tied_counts[distinct - 1] += run_sizes[j]
    tied_tokens = tied_tokens[:distinct]
    drawn = draw_patches(tied_counts[:distinct], quota, seed)
    if mode == PATCH_TOKENS:
        best = np.full(side, np.inf, dtype=np.float32)
        found, count = np.empty(min(k, side), dtype=np.int64), 0
        for g in range(nearer_end):
            for run in range(group_run_start[groups[g]], group_run_start[groups[g] + 1]):
                token = run_token[run]
                if best[token] == np.inf:
                    found[count] = token
                    count += 1
                best[token] = min(best[token], group_distance[g])
        for j in range(distinct):
            if drawn[j] > 0 and best[tied_tokens[j]] == np.inf:
                best[tied_tokens[j]] = boundary
                found[count] = tied_tokens[j]
                count += 1
        chosen = _by_distance(found[:count], best)
        for rank in range(len(chosen)):
            tokens[rank], distances[rank] = chosen[rank], best[chosen[rank]]
        return boundary
    slot = 0
    for g in np.argsort(group_distance[:nearer_end], kind="mergesort"):
        for run in range(group_run_start[groups[g]], group_run_start[groups[g] + 1]):
            for patch in range(run_patch_start[run], run_patch_start[run + 1]):
                tokens[slot], distances[slot], ids[slot] = run_token[run], group_distance[g], patch_ids[patch]
                slot += 1
    for g in range(nearer_end, tied_end):  # the drawn tied patches: of each token, its first tied ones
        for run in range(group_run_start[groups[g]], group_run_start[groups[g] + 1]):
            j = np.searchsorted(tied_tokens, run_token[run])
            take = min(drawn[j], run_patch_start[run + 1] - run_patch_start[run])
            drawn[j] -= take
            for patch in range(run_patch_start[run], run_patch_start[run] + take):
                tokens[slot], distances[slot], ids[slot] = run_token[run], boundary, patch_ids[patch]
                slot += 1
    return boundary


@numba.njit(cache=True, nogil=True)
def select_found(found_distances, found_tokens, found_ids, seeds, k, mode, side):
    """`select` over ranked FAISS results: distances [B, n] float32, tokens [B, n] int64 and ids [B, n] int64 (-1 past
    the results), seeds [B] -> (tokens [B, k] int64, distances [B, k] float32, ids [B, k] int64, boundary [B]
    float32)."""
    batch, n = found_ids.shape
    tokens = np.full((batch, k), -1, dtype=np.int64)
    distances = np.full((batch, k), np.inf, dtype=np.float32)
    ids = np.full((batch, k), -1, dtype=np.int64)
    boundary = np.empty(batch, dtype=np.float32)
    steps = np.arange(n + 1)
    for row in range(batch):
        valid = 0
        while valid < n and found_ids[row, valid] >= 0:
            valid += 1
        boundary[row] = select(found_distances[row, :valid].copy(), np.ones(valid, dtype=np.int64),
                               steps[:valid].copy(), steps, found_tokens[row], steps, found_ids[row], k, mode,
                               seeds[row], side, tokens[row], distances[row], ids[row])
    return tokens, distances, ids, boundary


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
def _search_row(query, salt, centroids, nprobe, slot_vectors, list_key_start, key_slots, key_sizes, key_run_start,
                run_token, run_patch_start, patch_ids, k, mode, tokens, distances, ids):
    """One query [S * d]: the keys of its probed lists, scored, then `select`."""
    slots, side, dim, lists = key_slots.shape[1], slot_vectors.shape[0], slot_vectors.shape[1], centroids.shape[0]
    list_distances = _list_distances(query, centroids)
    probes = min(nprobe, lists)
    nearest = kth_smallest(list_distances, probes - 1)
    table = np.empty((slots, side), dtype=np.float32)  # the query's distance to every slot vector, per slot
    for slot in range(slots):
        for entry in range(side):
            total = np.float32(0.0)
            for j in range(dim):
                diff = query[slot * dim + j] - slot_vectors[entry, j]
                total += diff * diff
            table[slot, entry] = total
    probed = np.zeros(lists, dtype=np.bool_)
    count, keys = 0, 0
    for number in range(lists):
        if list_distances[number] <= nearest and count < probes:
            probed[number] = True
            count += 1
            keys += list_key_start[number + 1] - list_key_start[number]
    groups = np.empty(keys, dtype=np.int64)
    group_distance = np.empty(keys, dtype=np.float32)
    group_sizes = np.empty(keys, dtype=np.int64)
    filled = 0
    for number in range(lists):
        if probed[number]:
            for key in range(list_key_start[number], list_key_start[number + 1]):
                distance = np.float32(0.0)
                for slot in range(slots):
                    distance += table[slot, key_slots[key, slot]]
                groups[filled], group_distance[filled], group_sizes[filled] = key, distance, key_sizes[key]
                filled += 1
    select(group_distance, group_sizes, groups, key_run_start, run_token, run_patch_start, patch_ids, k, mode,
           query_seed(query, salt), side - 1, tokens, distances, ids)


@numba.njit(cache=True, nogil=True)
def search(queries, salts, centroids, nprobe, slot_vectors, list_key_start, key_slots, key_sizes, key_run_start,
           run_token, run_patch_start, patch_ids, k, mode):
    """queries [B, S * d] float32, salts [B] int64 -> (tokens [B, k] int64, squared L2 [B, k] float32, patch ids
    [B, k] int64), -1 / inf / -1 past the results."""
    tokens = np.full((queries.shape[0], k), -1, dtype=np.int64)
    distances = np.full((queries.shape[0], k), np.inf, dtype=np.float32)
    ids = np.full((queries.shape[0], k), -1, dtype=np.int64)
    for row in range(queries.shape[0]):
        _search_row(queries[row], salts[row], centroids, nprobe, slot_vectors, list_key_start, key_slots, key_sizes,
                    key_run_start, run_token, run_patch_start, patch_ids, k, mode, tokens[row], distances[row],
                    ids[row])
    return tokens, distances, ids


@numba.njit(cache=True, nogil=True)
def search_at(generated, step, grid, offsets, centroids, nprobe, slot_vectors, list_key_start, key_slots, key_sizes,
              key_run_start, run_token, run_patch_start, patch_ids, k, mode):
    """`search` of the generation-time queries of raster position `step` (`neighbourhood.query_vectors`), salted with
    the step: generated [B, t] int64 tokens so far (-1 = not generated); offsets [S, 2] int64, the key's (row,
    column) offsets. A neighbour outside the grid, at a position >= t, or -1 is the zero vector."""
    batch, known = generated.shape
    slots, side, dim = offsets.shape[0], slot_vectors.shape[0], slot_vectors.shape[1]
    tokens = np.full((batch, k), -1, dtype=np.int64)
    distances = np.full((batch, k), np.inf, dtype=np.float32)
    ids = np.full((batch, k), -1, dtype=np.int64)
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
        _search_row(query, step, centroids, nprobe, slot_vectors, list_key_start, key_slots, key_sizes,
                    key_run_start, run_token, run_patch_start, patch_ids, k, mode, tokens[row], distances[row],
                    ids[row])
    return tokens, distances, ids
