"""Patch index types at 1M and 10M patches: bytes per patch, build and query throughput, recall. Prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/patch_index.py --vq results/demo/models/vq \\
        --database results/demo/shapes/database --heldout results/demo/shapes/heldout [--sizes 1000000 10000000]

Token statistics are the Shapes world's: the database split is encoded with the trained VQ; a size up to the
split's patches uses its real grids, a larger one adds grids sampled token by token (raster order) from the
split's p(token | up-left, up, up-right, left) (backing off to p(token | up, left)), the latents of sampled
patches being drawn from the real latents of the same token. Queries are built from held-out grids exactly as
at generation time (codebook vectors of the neighbours, `grid_queries`), so exact neighbourhood matches occur
as often as they would.

Index types: ``tokens`` (distinct codebook keys as token tuples, PQ whose sub-codebooks are the VQ codebook, IVF;
the recall-vs-nprobe curve and throughput at --token-nprobe), FAISS ``flat`` (exact) and ``ivfpq`` (OPQ8, IVF,
PQ8 as the official code; recall-vs-nprobe curve) over codebook and latent keys. Bytes per patch count keys,
values and patch ids (FAISS types: code or vector + 8-byte id + 2-byte token grid).

Recall: a returned item counts when its exact distance is at most the k-th exact distance (ties between patches
sharing a key are not misses); -1 results count as misses. Settings: FAiD's (k = 10 patches) and, for the tokens
type, the k nearest distinct tokens (``distinct_tokens``, k = codebook size / 8 as the official 2048 of 16384), with
the throughput of DAiD's default at that k as well (the distinct tokens of the k nearest patches). Exact references
are FAISS IndexFlatL2 searches over the float keys (over the distinct (key, token) runs for distinct-token search).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from arrag.models.vq import codebook_vectors
from arrag.patchdb.encode import encode_images, load_vq
from arrag.patchdb.fingerprint import Fingerprint, codebook_sha256
from arrag.patchdb.index import PatchIndex, set_nprobe
from arrag.patchdb.neighbourhood import KeySpec, codebook_keys, grid_queries, latent_keys, neighbours
from arrag.patchdb.sources import read_sources
from arrag.patchdb.token_index import TokenStore, train_lists


def encoded(vq, folder: Path, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Token grids [n, h, w] and latents [n, h, w, d] of a split folder (cached)."""
    if cache.is_file():
        with np.load(cache) as data:
            return data["tokens"], data["latents"]
    images = [data for source in read_sources(folder) for _, data in source.read()]
    tokens, latents = encode_images(vq, images, batch_size=256, with_latents=True, desc=f"encode {folder.name}")
    np.savez(cache, tokens=tokens, latents=latents)
    return tokens, latents


def sample_grids(tokens: np.ndarray, latents: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` grids sampled in raster order from the empirical p(token | up-left, up, up-right, left) of
    `tokens` (-1 outside), backing off to p(token | up, left) and then p(token) for unseen contexts."""
    rng = np.random.default_rng(seed)
    n, grid = tokens.shape[:2]
    side = int(tokens.max()) + 2
    padded = np.full((n, grid + 1, grid + 2), -1, np.int64)
    padded[:, 1:, 1:-1] = tokens

    def codes(ul, u, ur, left):  # full (up-left, up, up-right, left) context code and (up, left) code
        ul, u, ur, left = ul + 1, u + 1, ur + 1, left + 1
        return ((ul * side + u) * side + ur) * side + left, u * side + left

    full_context, pair_context = codes(padded[:, :-1, :-2], padded[:, :-1, 1:-1], padded[:, :-1, 2:],
                                       padded[:, 1:, :-2])
    following = tokens.reshape(n, grid, grid)
    tables = []
    for context in (full_context, pair_context):
        order = np.argsort(context.ravel(), kind="stable")
        tables.append((context.ravel()[order], following.ravel()[order]))
    out = np.full((count, grid + 1, grid + 2), -1, np.int64)
    for r in range(grid):
        for c in range(grid):
            choice = rng.integers(0, len(tables[0][1]), count)  # back-off of last resort: any cell
            pending = np.ones(count, dtype=bool)
            wanted_codes = codes(out[:, r, c], out[:, r, c + 1], out[:, r, c + 2], out[:, r + 1, c])
            for (keys, values), wanted in zip(tables, wanted_codes, strict=True):
                start = np.searchsorted(keys, wanted)
                size = np.searchsorted(keys, wanted, side="right") - start
                use = pending & (size > 0)
                choice[use] = (start + (rng.random(count) * size).astype(np.int64))[use]
                pending &= size == 0
                out[use, r + 1, c + 1] = values[choice[use]]
            out[pending, r + 1, c + 1] = tables[0][1][choice[pending]]
    grids = out[:, 1:, 1:-1]
    flat_tokens = tokens.ravel()
    by_token = np.argsort(flat_tokens, kind="stable")
    first = np.searchsorted(flat_tokens[by_token], grids.ravel())
    size = np.searchsorted(flat_tokens[by_token], grids.ravel(), side="right") - first
    chosen = by_token[first + (rng.random(grids.size) * size).astype(np.int64)]
    return grids.astype(tokens.dtype), latents.reshape(-1, latents.shape[-1])[chosen].reshape(*grids.shape, -1)


def database(tokens, latents, size: int, seed: int):
    grid = tokens.shape[1]
    images = -(-size // (grid * grid))
    if images <= len(tokens):
        return tokens[:images], latents[:images]
    extra_tokens, extra_latents = sample_grids(tokens, latents, images - len(tokens), seed)
    return np.concatenate([tokens, extra_tokens]), np.concatenate([latents, extra_latents])


def per_patch(grids: np.ndarray, latents: np.ndarray, codebook: torch.Tensor, spec: KeySpec, space: str):
    """(float keys [P, D] of the key space, neighbour tokens [P, S], value tokens [P]) in patch-id order."""
    tokens = torch.from_numpy(grids.astype(np.int64))
    slots = neighbours(tokens, spec, -1).flatten(0, 2).numpy()
    if space == "codebook":
        keys = codebook_keys(tokens, codebook, spec)
    else:
        keys = latent_keys(torch.from_numpy(latents), spec)
    return np.ascontiguousarray(keys.flatten(0, 2).numpy()), slots, grids.reshape(-1)


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def exact_patch_distances(keys: np.ndarray, queries: np.ndarray, ids: torch.Tensor) -> np.ndarray:
    valid = ids.numpy() >= 0
    distance = np.full(ids.shape, np.inf)
    rows = np.nonzero(valid)[0]
    distance[valid] = ((keys[ids.numpy()[valid]] - queries[rows]) ** 2).sum(-1)
    return distance


def recall(found: np.ndarray, kth: np.ndarray) -> float:
    """Share of the k returned items whose exact distance is within the exact k-th distance."""
    tolerance = 1e-5 * np.maximum(1.0, kth)
    return float((found <= (kth + tolerance)[:, None]).mean())


def nearest_distinct(tokens: torch.Tensor, distances: torch.Tensor, k: int, codebook_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest distinct tokens of ranked results [B, n] (-1 ignored): ([B, k] long, [B, k] float32)."""
    rows = torch.arange(len(tokens))[:, None].expand_as(tokens)
    valid = tokens >= 0
    best = torch.full((len(tokens), codebook_size), float("inf"))
    best.view(-1).scatter_reduce_(0, (rows * codebook_size + tokens)[valid], distances[valid].float(), "amin")
    nearest, token = best.topk(min(k, codebook_size), largest=False)
    out_tokens = torch.full((len(tokens), k), -1, dtype=torch.long)
    out_distances = torch.full((len(tokens), k), float("inf"))
    out_tokens[:, :nearest.shape[1]] = torch.where(nearest.isfinite(), token, -1)
    out_distances[:, :nearest.shape[1]] = nearest
    return out_tokens, out_distances


def distinct_reference(run_keys: np.ndarray, run_tokens: np.ndarray, queries: np.ndarray, k: int, side: int):
    """Exact per-query distance of every distinct token near enough: {token: distance} dicts and k-th distances."""
    flat = faiss.IndexFlatL2(run_keys.shape[1])
    flat.add(run_keys)
    fetch = min(len(run_keys), 16 * k)
    while True:
        d, i = flat.search(queries, fetch)
        tokens, distances = nearest_distinct(torch.from_numpy(run_tokens[i.clip(0)].astype(np.int64)),
                                             torch.from_numpy(d), side, side)
        count = (tokens >= 0).sum(1)
        kth = distances[torch.arange(len(queries)), (count.clamp(max=k) - 1).clamp(min=0)].numpy()
        enough = (d[:, -1] > kth) | (fetch == len(run_keys))  # every token within the k-th distance was seen
        if enough.all():
            table = [dict(zip(t[t >= 0].tolist(), x[t >= 0].tolist(), strict=True)) for t, x in zip(tokens, distances,
                                                                                                  strict=True)]
            return table, kth
        fetch = min(len(run_keys), fetch * 4)


def distinct_runs(store: TokenStore, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float key and value token of each distinct (key, token) run of a store (keys in patch-id order)."""
    run_start = np.concatenate([[0], np.cumsum(store.run_counts, dtype=np.int64)[:-1]])
    first_patch = store.patch_ids.astype(np.int64)[run_start]
    return np.ascontiguousarray(keys[first_patch]), (store.run_tokens & 0x7FFF).astype(np.int64)


def distinct_recall(tokens: torch.Tensor, table: list[dict], kth: np.ndarray) -> float:
    hits = [sum(1 for t in row.tolist() if t >= 0 and table[b].get(t, np.inf) <= kth[b] + 1e-5 * max(1.0, kth[b]))
            for b, row in enumerate(tokens)]
    return float(np.sum(hits) / tokens.numel())


def steady_seconds(function, *args, repeats: int = 3) -> float:
    """Median wall time of `function(*args)` over `repeats` calls after one untimed warm-up call (first-touch page
    faults and thread-pool start-up are not throughput)."""
    function(*args)
    return statistics.median(timed(function, *args)[1] for _ in range(repeats))


def throughput(index, queries: torch.Tensor, k: int, distinct: str | None, single: int) -> dict:
    batch_seconds = steady_seconds(index.search, queries, k, distinct)
    started = time.perf_counter()
    for q in queries[:single]:
        index.search(q[None], k, distinct)
    single_seconds = time.perf_counter() - started
    return {f"qps_batch{len(queries)}": round(len(queries) / batch_seconds, 1),
            "qps_batch1": round(single / single_seconds, 1)}


def bench_size(size, grids, latents, codebook, spec, queries, args) -> list[dict]:
    results = []
    grid = grids.shape[1]
    patches = grids.shape[0] * grid * grid
    (keys, slots, values), key_seconds = timed(per_patch, grids, latents, codebook, spec, "codebook")
    exact = faiss.IndexFlatL2(keys.shape[1])
    _, exact_seconds = timed(exact.add, keys)
    reference, _ = timed(exact.search, queries.numpy(), 10)
    kth10 = reference[0][:, -1]
    k_daid = args.daid_k or len(codebook) // 8
    # --- tokens (distinct codebook keys stored as token tuples, PQ with the VQ codebook, IVF)
    ids = np.arange(patches)
    nlist = args.token_nlist or round(patches**0.5)
    rng = np.random.default_rng(args.seed)
    sample = np.unique(keys[rng.choice(patches, min(patches, 40 * nlist), replace=False)], axis=0)
    centroids, train_seconds = timed(train_lists, sample, nlist, args.seed)
    store, build_seconds = timed(TokenStore.build, codebook, spec, centroids, slots, values, ids)
    fingerprint = Fingerprint.expected(codebook, grid, spec, "tokens")
    index = PatchIndex(fingerprint, codebook, store, None, np.zeros(0, str), np.zeros(0, np.uint8), [])
    run_keys, run_tokens = distinct_runs(store, keys)
    table, kth_daid = distinct_reference(run_keys, run_tokens, queries.numpy(), k_daid, len(codebook))
    curve, curve_daid, speed = {}, {}, {}
    for nprobe in args.token_nprobes:
        store.set_nprobe(nprobe)
        _, _, found = store.search(queries, 10)
        curve[nprobe] = recall(exact_patch_distances(keys, queries.numpy(), found), kth10)
        speed[nprobe] = round(len(queries) / steady_seconds(store.search, queries, 10), 1)
        curve_daid[nprobe] = distinct_recall(index.search(queries, k_daid, "distinct_tokens")[0], table, kth_daid)
    store.set_nprobe(args.token_nprobe)
    results.append({
        "size": size, "patches": patches, "key_space": "codebook", "type": "tokens", "nlist": nlist,
        "nprobe": args.token_nprobe, "bytes_per_patch": round(store.nbytes() / patches, 3),
        "bytes_breakdown": {n: round(np.asarray(getattr(store, n)).nbytes / patches, 3) for n in TokenStore.ARRAYS},
        "distinct_keys_per_patch": round(len(store.codes) / patches, 4),
        "runs_per_patch": round(len(store.run_tokens) / patches, 4),
        "build_patches_per_s": round(patches / (key_seconds + train_seconds + build_seconds)),
        "build_seconds": {"keys": round(key_seconds, 2), "lists": round(train_seconds, 2),
                          "store": round(build_seconds, 2)},
        "recall_at_10_by_nprobe": curve, f"qps_batch{len(queries)}_at_10_by_nprobe": speed,
        f"recall_distinct_at_{k_daid}_by_nprobe": curve_daid,
        "k10": throughput(index, queries, 10, None, args.single),
        f"distinct_k{k_daid}": throughput(index, queries, k_daid, "distinct_tokens", args.single),
        f"daid_k{k_daid}": throughput(index, queries, k_daid, "patches", args.single),
    })
    print(json.dumps(results[-1]), flush=True)
    del store, index
    # --- FAISS types over codebook and latent keys
    for space in args.key_spaces:
        if space == "codebook":
            space_keys, space_exact, exact_build = keys, exact, exact_seconds
        else:
            space_keys = per_patch(grids, latents, codebook, spec, space)[0]
            space_exact = faiss.IndexFlatL2(space_keys.shape[1])
            _, exact_build = timed(space_exact.add, space_keys)
        for kind in args.types:
            if kind == "flat":  # the exact index itself (patch ids are row numbers here)
                faiss_index, build = space_exact, exact_build
                bytes_per_patch = 4 * space_keys.shape[1] + 8 + grids.itemsize  # with explicit int64 ids
                curve = {"exact": None}
            else:
                started = time.perf_counter()
                faiss_index = faiss.index_factory(space_keys.shape[1], f"OPQ8,IVF{args.nlist},PQ8")
                rng = np.random.default_rng(0)
                faiss_index.train(space_keys[rng.choice(patches, min(patches, 100 * args.nlist), replace=False)])
                faiss_index.add_with_ids(space_keys, ids)
                build = time.perf_counter() - started
                bytes_per_patch = faiss.extract_index_ivf(faiss_index).code_size + 8 + grids.itemsize
                curve = {nprobe: None for nprobe in args.nprobes}
            index = PatchIndex(Fingerprint.expected(codebook, grid, KeySpec(spec.neighbourhood, spec.hops, space),
                                                    kind), codebook, faiss_index, grids.reshape(len(grids), -1),
                               np.zeros(0, str), np.zeros(0, np.uint8), [])
            reference_space = space_exact.search(queries.numpy(), 10)[0][:, -1]
            for nprobe in curve:
                if kind == "ivfpq":
                    set_nprobe(faiss_index, nprobe)
                _, _, found_ids = index.search_patches(queries, 10)
                curve[nprobe] = recall(exact_patch_distances(space_keys, queries.numpy(), found_ids), reference_space)
            entry = {"size": size, "patches": patches, "key_space": space, "type": kind,
                     "bytes_per_patch": bytes_per_patch, "build_patches_per_s": round(patches / build)}
            if kind == "flat":
                entry["recall_at_10"] = curve["exact"]
                entry["k10"] = throughput(index, queries[:args.flat_queries], 10, None, 4)
            else:
                entry["recall_at_10_by_nprobe"] = curve
                set_nprobe(faiss_index, args.nprobe)
                entry["nprobe"] = args.nprobe
                entry["k10"] = throughput(index, queries, 10, None, args.single)
            results.append(entry)
            print(json.dumps(entry), flush=True)
            del index
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vq", required=True, help="trained Shapes VQ (or backbone) folder")
    parser.add_argument("--database", required=True, type=Path, help="Shapes database split (token statistics)")
    parser.add_argument("--heldout", required=True, type=Path, help="Shapes held-out split (queries)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--types", nargs="*", default=["flat", "ivfpq"], help="FAISS types (tokens always runs)")
    parser.add_argument("--key-spaces", nargs="+", default=["codebook", "latent"])
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--single", type=int, default=200, help="queries timed one at a time (batch 1)")
    parser.add_argument("--flat-queries", type=int, default=128, help="queries timed on flat (it is slow)")
    parser.add_argument("--daid-k", type=int, default=0, help="DAiD's k (0: codebook size / 8)")
    parser.add_argument("--nlist", type=int, default=1024, help="ivfpq lists")
    parser.add_argument("--token-nlist", type=int, default=0, help="tokens lists (0: sqrt(patches))")
    parser.add_argument("--token-nprobe", type=int, default=8, help="tokens nprobe of the throughput numbers")
    parser.add_argument("--token-nprobes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--nprobe", type=int, default=32, help="ivfpq nprobe of the throughput numbers")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "patch_index_bench",
                        help="encoded splits are cached here, per VQ codebook")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    args.cache.mkdir(parents=True, exist_ok=True)
    vq = load_vq(args.vq)
    codebook = codebook_vectors(vq, normalized=True).detach().float()
    cache = args.cache / codebook_sha256(codebook)[:16]  # encodings of another VQ are never reused
    cache.mkdir(parents=True, exist_ok=True)
    tokens, latents = encoded(vq, args.database, cache / "database.npz")
    held_tokens, _ = encoded(vq, args.heldout, cache / "heldout.npz")
    spec = KeySpec("L", "1")
    rng = np.random.default_rng(args.seed)
    all_queries, _ = grid_queries(torch.from_numpy(held_tokens.astype(np.int64)), codebook, spec)
    all_queries = all_queries.flatten(0, 1)
    queries = all_queries[torch.from_numpy(rng.choice(len(all_queries), args.queries, replace=False))].contiguous()
    report = {"benchmark": "patch_index", "threads": torch.get_num_threads(),
              "faiss_threads": faiss.omp_get_max_threads(), "codebook": list(codebook.shape),
              "grid": int(tokens.shape[1]), "neighbourhood": "L1", "real_patches": int(tokens.size),
              "queries": args.queries, "results": []}
    for size in args.sizes:
        grids, grid_latents = database(tokens, latents, size, args.seed)
        report["results"] += bench_size(size, grids, grid_latents, codebook, spec, queries, args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
