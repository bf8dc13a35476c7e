"""Sharded build of a patch index: encode shards -> train once -> add each shard -> merge.

    train_index(shards, out, params)     layout of all shards (image offsets) + the trained empty index
    add_shard(trained, shard, out)       one shard's keys under global patch ids
    merge_index(added, shards, out)      one index + values + fingerprint (`PatchIndex.load` reads it)

Global patch id = (image offset of the shard + image index in the shard) * grid ** 2 + raster position, so ids
do not depend on the order in which shards are added, and a sharded build equals a one-shot build (the token
store is rebuilt sorted; FAISS lists are concatenated in shard order). Under the `skip` edge policy cells
without a full neighbourhood are not added (their ids are unused). Every shard is kept whole: no remainder of
a batch or chunk is dropped.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from arrag.patchdb.encode import read_shard, save_npz_atomic, shard_meta
from arrag.patchdb.fingerprint import Fingerprint, read_metadata
from arrag.patchdb.index import INDEX_TYPES, metadata_path, values_path
from arrag.patchdb.neighbourhood import KeySpec, codebook_keys, latent_keys, neighbours, usable_cells
from arrag.patchdb.sources import held_out
from arrag.patchdb.token_index import TokenStore, train_lists


@dataclass(frozen=True)
class IndexParams:
    kind: str = "tokens"  # flat | ivfpq | tokens
    nlist: int = 0  # inverted lists; 0: ivfpq 4 sqrt(patches), tokens sqrt(patches), within [16, 65536]
    pq_m: int = 8  # ivfpq: OPQ rotation and PQ sub-quantisers (official: 8)
    pq_bits: int = 8  # ivfpq: bits per sub-quantiser code (official: 8; needs >= 256 training keys)
    # lists visited per query (ours); 0: ivfpq 32 (the value the official retriever passes), tokens 8 (recall@10 1.0
    # at 10M); `official_nprobe`: 1, as the official runs probed (their nprobe, set on the OPQ wrapper, where FAISS
    # ignores it, never reached the IVF)
    nprobe: int = 0
    train_size: int = 0  # training keys; 0: ivfpq 100 nlist (official), tokens 40 nlist; at most all patches
    seed: int = 0
    official_nprobe: bool = False

    @property
    def probes(self) -> int:
        if self.official_nprobe:
            return 1
        return self.nprobe or (32 if self.kind == "ivfpq" else 8)

    def __post_init__(self) -> None:
        if self.kind not in INDEX_TYPES:
            raise ValueError(f"index type must be one of {INDEX_TYPES}, got {self.kind!r}")


def write_faiss_atomic(index, path: str | Path) -> None:
    """faiss.write_index to a temporary file in the same folder, then rename."""
    import faiss

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shard_patches(shard: dict, spec: KeySpec, image_offset: int, with_keys: bool
                  ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]:
    """Per-patch arrays of a shard: (float keys [P, D] or None, neighbour tokens [P, S] (-1 = missing),
    value tokens [P], global patch ids [P]); cells without a key under the edge policy are left out."""
    tokens = torch.from_numpy(shard["tokens"].astype(np.int64))
    count, grid = tokens.shape[:2]
    usable = usable_cells(grid, spec).flatten()
    positions = torch.arange(grid * grid)[usable]
    ids = ((torch.arange(count)[:, None] + image_offset) * grid * grid + positions).flatten()
    slot_tokens = neighbours(tokens, spec, -1).flatten(1, 2)[:, usable].flatten(0, 1)
    values = tokens.flatten(1)[:, usable].flatten()
    keys = None
    if with_keys:
        if spec.key_space == "latent":
            keys = latent_keys(torch.from_numpy(shard["latents"]), spec)
        else:
            keys = codebook_keys(tokens, torch.from_numpy(shard["codebook"]), spec)
        keys = keys.flatten(1, 2)[:, usable].flatten(0, 1).numpy()
    return keys, slot_tokens.numpy(), values.numpy(), ids.numpy()


def default_nlist(patches: int, kind: str) -> int:
    return int(min(65536, max(16, round((4 if kind == "ivfpq" else 1) * patches**0.5))))


def train_index(shard_paths: list[str | Path], out: str | Path, params: IndexParams, spec: KeySpec | None = None
                ) -> dict:
    """Write the trained, empty index at `out` and `out`.json (fingerprint without data, shard layout).

    `spec` redefines the keys (default: the shards' own): codebook-space keys are made from the stored tokens, so
    one encoding serves several neighbourhoods (e.g. the L index of an autoregressive backbone and the O index of
    a masked one over the same tokenizer); latent keys need the shards' own definition."""
    import faiss

    metas = sorted((shard_meta(p) | {"path": str(p)} for p in shard_paths), key=lambda m: m["shard"])
    if [m["shard"] for m in metas] != list(range(metas[0]["shards"])) or len(metas) != metas[0]["shards"]:
        raise ValueError(f"expected shards 0..{metas[0]['shards'] - 1}, got {[m['shard'] for m in metas]}")
    for meta in metas[1:]:
        if meta["fingerprint"] != metas[0]["fingerprint"]:
            raise ValueError(f"{meta['path']} was encoded with another codebook or key settings than shard 0")
    fingerprint = Fingerprint.from_dict(metas[0]["fingerprint"])
    if spec is not None and spec != fingerprint.spec:
        if spec.key_space != "codebook":
            raise ValueError(f"the shards hold {fingerprint.spec}; only codebook-space keys can be redefined, "
                             f"not {spec}")
        fingerprint = replace(fingerprint, neighbourhood=spec.neighbourhood, hops=spec.hops,
                              key_space=spec.key_space, edge_policy=spec.edge_policy)
    spec = fingerprint.spec
    if params.kind == "tokens" and spec.key_space != "codebook":
        raise ValueError("index type 'tokens' stores codebook-space keys; use flat or ivfpq for latent keys")
    offsets = np.cumsum([0] + [m["images"] for m in metas]).tolist()
    patches = int(usable_cells(fingerprint.grid, spec).sum()) * offsets[-1]
    if patches == 0:
        raise ValueError(f"no patch has a key: {offsets[-1]} images, {fingerprint.grid}x{fingerprint.grid} grids, "
                         f"{spec.edge_policy} edge policy with hops {spec.hops}")
    dimension = spec.slots * fingerprint.embed_dim
    nlist = params.nlist or default_nlist(patches, params.kind)
    details = {"nprobe": params.probes}
    if params.kind == "ivfpq":
        sample = training_sample(metas, spec, offsets, min(patches, params.train_size or 100 * nlist), params.seed)
        index = faiss.index_factory(dimension, f"OPQ{params.pq_m},IVF{nlist},PQ{params.pq_m}x{params.pq_bits}")
        index.train(sample)
        details |= {"nlist": nlist, "train_size": len(sample)}
        write_faiss_atomic(index, out)
    elif params.kind == "flat":
        write_faiss_atomic(faiss.IndexIDMap2(faiss.IndexFlatL2(dimension)), out)
    else:  # k-means lists over distinct keys (the PQ sub-codebooks are the VQ codebook: nothing to learn)
        sample = training_sample(metas, spec, offsets, min(patches, params.train_size or 40 * nlist), params.seed)
        sample = np.unique(sample, axis=0)
        nlist = min(nlist, len(sample))
        save_npz_atomic(out, centroids=train_lists(sample, nlist, params.seed))
        details |= {"nlist": nlist, "train_size": len(sample)}
    layout = {"shards": [{"shard": m["shard"], "image_offset": o, "images": m["images"]}
                         for m, o in zip(metas, offsets, strict=False)], "images": offsets[-1], "patches": patches}
    Fingerprint(**{**fingerprint.to_dict(), "datasets": None, "index_type": params.kind}).write(
        metadata_path(out), params=asdict(params) | details, layout=layout)
    return layout


def training_sample(metas: list[dict], spec: KeySpec, offsets: list[int], size: int, seed: int) -> np.ndarray:
    """About `size` keys: every key of the images whose hashed id falls in a fraction size / patches, in (image
    id, position) order, so the sample (and what is trained on it) does not depend on the sharding."""
    total = sum(m["images"] for m in metas)
    cells = int(usable_cells(Fingerprint.from_dict(metas[0]["fingerprint"]).grid, spec).sum())
    fraction = min(1.0, size / max(1, total * cells))
    parts, names = [], []
    for meta, offset in zip(metas, offsets, strict=False):
        shard = read_shard(meta["path"], spec.key_space == "latent")
        chosen = [i for i, name in enumerate(shard["image_ids"]) if held_out(f"train-{seed}", str(name), fraction)
                  or fraction >= 1.0]
        if not chosen:
            continue
        subset = {**shard, "tokens": shard["tokens"][chosen]}
        if "latents" in shard:
            subset["latents"] = shard["latents"][chosen]
        keys, *_ = shard_patches(subset, spec, offset, True)
        parts.append(keys.reshape(len(chosen), cells, -1))
        names += [str(shard["image_ids"][i]) for i in chosen]
    if not parts:
        raise ValueError("no training keys: the shards hold no images")
    order = np.argsort(np.array(names), kind="stable")
    return np.ascontiguousarray(np.concatenate(parts)[order].reshape(-1, parts[0].shape[-1]), dtype=np.float32)


def add_shard(trained: str | Path, shard_path: str | Path, out: str | Path) -> int:
    """Add one shard's patches to a copy of the trained index, written at `out`; returns the count."""
    import faiss

    fingerprint, meta = read_metadata(metadata_path(trained))
    shard = read_shard(shard_path, with_latents=fingerprint.key_space == "latent")
    expected = replace(fingerprint, index_type=None)
    if fingerprint.key_space == "codebook":  # keys come from the stored tokens (see `train_index`)
        expected = replace(expected, neighbourhood=None, hops=None, key_space=None, edge_policy=None)
    Fingerprint.from_dict(shard["meta"]["fingerprint"]).check(expected, where=f"shard {shard_path}")
    offset = {s["shard"]: s["image_offset"] for s in meta["layout"]["shards"]}[shard["meta"]["shard"]]
    keys, slot_tokens, values, ids = shard_patches(shard, fingerprint.spec, offset, fingerprint.index_type != "tokens")
    if fingerprint.index_type == "tokens":
        with np.load(trained, allow_pickle=False) as data:
            centroids = data["centroids"]
        store = TokenStore.build(torch.from_numpy(shard["codebook"]), fingerprint.spec, centroids, slot_tokens,
                                 values, ids)
        save_npz_atomic(out, **{name: getattr(store, name) for name in TokenStore.ARRAYS})
    else:
        index = faiss.read_index(str(trained))
        index.add_with_ids(np.ascontiguousarray(keys, dtype=np.float32), ids.astype(np.int64))
        write_faiss_atomic(index, out)
    fingerprint.write(metadata_path(out), **meta, shard=shard["meta"]["shard"])
    return len(ids)


def merge_index(added_paths: list[str | Path], shard_paths: list[str | Path], out: str | Path,
                ondisk: bool = False) -> Fingerprint:
    """Merge the added shards (any order) into `out` with its values and the complete fingerprint.

    With `ondisk` (ivfpq), the inverted lists go to `out`.ivfdata via faiss.contrib.ondisk.merge_ondisk, so
    the index can exceed RAM; otherwise lists are merged in memory (IndexIVF.merge_from)."""
    import faiss

    added = sorted(added_paths, key=lambda p: read_metadata(metadata_path(p))[1]["shard"])
    shards = sorted((read_shard(p) for p in shard_paths), key=lambda s: s["meta"]["shard"])
    fingerprint, meta = read_metadata(metadata_path(added[0]))
    if [read_metadata(metadata_path(p))[1]["shard"] for p in added] != [s["meta"]["shard"] for s in shards]:
        raise ValueError("the added indexes and the shard files are not the same shards")
    if fingerprint.index_type == "tokens":
        stores = []
        for path in added:
            with np.load(path, allow_pickle=False) as data:
                stores.append(TokenStore(torch.from_numpy(shards[0]["codebook"]), fingerprint.spec,
                                         **{n: data[n] for n in TokenStore.ARRAYS}))
        store = TokenStore.merge(stores)
        save_npz_atomic(out, **{name: getattr(store, name) for name in TokenStore.ARRAYS})
        total = store.size
    else:
        index = faiss.read_index(str(added[0]))
        if ondisk:
            from faiss.contrib.ondisk import merge_ondisk

            index.reset()
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            merge_ondisk(index, [str(p) for p in added], f"{out}.ivfdata")
        else:
            for path in added[1:]:
                other = faiss.read_index(str(path))
                if fingerprint.index_type == "ivfpq":
                    faiss.extract_index_ivf(index).merge_from(faiss.extract_index_ivf(other), 0)
                    index.ntotal = faiss.extract_index_ivf(index).ntotal
                else:
                    index.merge_from(other, 0)
        write_faiss_atomic(index, out)
        total = int(index.ntotal)
    sources = {}
    for shard in shards:
        for count in shard["meta"]["sources"]:
            entry = sources.setdefault(count["name"], [count["revision"], 0])
            entry[1] += count["kept"]
    patches_per_image = int(usable_cells(fingerprint.grid, fingerprint.spec).sum())
    datasets = tuple((name, revision, images, images * patches_per_image) for name, (revision, images)
                     in sources.items())
    names = [c["name"] for c in shards[0]["meta"]["sources"]]
    complete = Fingerprint(**{**fingerprint.to_dict(), "datasets": datasets, "patches": total,
                              "exclusions_sha256": shards[0]["meta"]["exclusions_sha256"]})
    values = {"codebook": shards[0]["codebook"], "image_ids": np.concatenate([s["image_ids"] for s in shards]),
              "image_source": np.concatenate([s["source"] for s in shards]).astype(np.uint8)}
    values["grids"] = (np.concatenate([s["tokens"].reshape(len(s["tokens"]), -1) for s in shards])
                       if fingerprint.index_type != "tokens" else np.zeros((0, 0), np.uint16))
    save_npz_atomic(values_path(out), **values)
    complete.write(metadata_path(out), params=meta["params"], layout=meta["layout"], sources=names,
                   shard_sources=[s["meta"]["sources"] for s in shards])
    return complete


def build_index(shard_paths: list[str | Path], out: str | Path, params: IndexParams, spec: KeySpec | None = None
                ) -> Fingerprint:
    """`train_index`, `add_shard` for every shard and `merge_index` in one call (for databases that one job can
    hold; the workflow's main index runs the three steps as separate jobs). Intermediate files go to a temporary
    folder beside `out` and are removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        trained = Path(work) / "trained"
        train_index(shard_paths, trained, params, spec)
        added = [Path(work) / f"added{i}" for i in range(len(shard_paths))]
        for shard, target in zip(shard_paths, added, strict=True):
            add_shard(trained, shard, target)
        return merge_index(added, shard_paths, out)
