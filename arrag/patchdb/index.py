"""`PatchIndex`: load a patch index, check its fingerprint, build queries and retrieve top-k tokens.

This is the API DAiD and FAiD call:

    index = PatchIndex.load(path, expected=Fingerprint.expected(codebook, grid, spec))  # mismatch: error
    queries, usable = index.queries(tokens_so_far, step)         # [B, D], [B]  (generation)
    queries, usable = index.grid_queries(token_grids)            # [B, N, D], [N] (teacher forcing)
    tokens, distances = index.search(queries, k, distinct=None)  # [B, k] long (-1: none), [B, k] float32
    tokens, distances = index.retrieve(tokens_so_far, step, k, distinct="patches")  # one decode step

Distances are squared L2 (inf where the token is -1). A -1 result never becomes a token. What a search returns
(`arrag.patchdb.scan`, the same for every index type): `distinct` None, the k nearest patches with duplicates
(FAiD); "patches", one entry per distinct token among the k nearest patches (DAiD, the official retriever); or
"distinct_tokens", the k nearest distinct tokens (ours). Ties at the k-th patch (or token) are drawn, seeded from
the query and a salt (generation: the step).

Index types (`kind`):
* ``tokens``: codebook key space only; distinct keys stored as token tuples, PQ with the VQ codebook as
  sub-codebooks (exact distances) in an IVF of `nprobe` lists per query (see `token_index`).
* ``flat``: FAISS IndexFlatL2 over the float keys, exact brute force (any key space; small databases).
* ``ivfpq``: FAISS OPQ + IVF-PQ as the official code (``OPQ8,IVF<nlist>,PQ8``, 8 bits); approximate, `nprobe`
  lists per query, set with ParameterSpace so that it reaches the IVF inside the OPQ IndexPreTransform (the
  official code set it on the wrapper, where FAISS ignores it: its runs probed 1 list, which
  `IndexParams.official_nprobe` reproduces). GPU FAISS is used when present and asked.
For the FAISS types a search fetches more than k neighbours, and more until the last one fetched lies beyond the
k-th patch (or token), so that every patch tied at the boundary takes part in the draw.

Files: ``<path>`` (the FAISS index, or the token store as .npz), ``<path>.json`` (fingerprint + build
metadata), ``<path>.values.npz`` (codebook, per-image ids and sources, and for FAISS types the token grids
that map a patch id to its token). Patch id = image index * grid ** 2 + raster position.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from arrag.patchdb import scan
from arrag.patchdb.fingerprint import Fingerprint, read_metadata
from arrag.patchdb.neighbourhood import KeySpec, grid_queries, query_cells, query_vectors
from arrag.patchdb.token_index import TokenStore

INDEX_TYPES = ("flat", "ivfpq", "tokens")


def metadata_path(path: str | Path) -> Path:
    return Path(f"{path}.json")


def values_path(path: str | Path) -> Path:
    return Path(f"{path}.values.npz")


def faiss_on_gpu(index, device: str):
    """The index moved to every GPU when `device` asks for cuda (or auto) and GPU FAISS is installed."""
    import faiss

    if device == "cpu" or not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
        return index, False
    return faiss.index_cpu_to_all_gpus(index), True


def set_nprobe(index, nprobe: int, on_gpu: bool = False) -> None:
    """Set nprobe on the IVF inside any wrapper (IndexPreTransform for OPQ, IndexIDMap, GPU clones)."""
    import faiss

    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", int(nprobe))


def get_nprobe(index) -> int | None:
    import faiss

    try:
        return int(faiss.extract_index_ivf(index).nprobe)
    except RuntimeError:
        return None


@contextmanager
def reading(file: str | Path, index: str | Path) -> Iterator[None]:
    """Errors of reading `file`, a part of the index at `index`, as one ValueError naming it and the fix (a missing
    file stays a FileNotFoundError)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, KeyError, RuntimeError, zipfile.BadZipFile) as err:
        raise ValueError(f"{file}: truncated or corrupt index file ({type(err).__name__}: {err}); delete {index} "
                         f"and its sidecars ({Path(index).name}.*) and rebuild the index (rerun its jobs)") from err


@dataclass
class PatchIndex:
    """A loaded patch index (see the module docstring). Build one with `arrag.patchdb.build`."""

    fingerprint: Fingerprint
    codebook: torch.Tensor  # [V, d] float32: the vectors codebook-space keys and all queries are made of
    backend: object  # faiss.Index or TokenStore
    grids: np.ndarray | None  # [images, grid ** 2] value tokens (FAISS types), patch id -> token
    image_ids: np.ndarray  # [images] str
    image_source: np.ndarray  # [images] index into `sources`
    sources: list[str]
    on_gpu: bool = False

    @classmethod
    def load(cls, path: str | Path, expected: Fingerprint | None = None, nprobe: int | None = None,
             device: str = "cpu") -> PatchIndex:
        """Load `path` and its sidecars; raise FingerprintMismatch if `expected` differs (before reading the
        index itself). `nprobe` overrides the stored one (ivfpq, tokens); `device` 'cuda'/'auto' uses GPU FAISS
        (flat, ivfpq)."""
        fingerprint, meta = read_metadata(metadata_path(path))
        fingerprint.check(expected, where=f"index {path}")
        with reading(values_path(path), path), np.load(values_path(path), allow_pickle=False) as values:
            codebook = torch.from_numpy(values["codebook"])
            grids = values["grids"] if fingerprint.index_type != "tokens" else None
            image_ids, image_source = values["image_ids"], values["image_source"]
        if fingerprint.index_type == "tokens":
            with reading(path, path), np.load(path, allow_pickle=False) as data:
                backend = TokenStore(codebook, fingerprint.spec, **{n: data[n] for n in TokenStore.ARRAYS},
                                     nprobe=nprobe or meta["params"]["nprobe"])
            on_gpu = False
        else:
            import faiss

            ondisk = Path(f"{path}.ivfdata").is_file()  # merge_ondisk lists, found beside the index
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR if ondisk else 0
            with reading(path, path):
                stored = faiss.read_index(str(path), flags)
            backend, on_gpu = faiss_on_gpu(stored, device)
        index = cls(fingerprint, codebook, backend, grids, image_ids, image_source, meta["sources"], on_gpu)
        if fingerprint.index_type == "ivfpq":
            index.nprobe = nprobe or meta["params"]["nprobe"]
        return index

    # ------------------------------------------------------------------------------------------- queries
    @property
    def spec(self) -> KeySpec:
        return self.fingerprint.spec

    @property
    def grid(self) -> int:
        return self.fingerprint.grid

    @property
    def kind(self) -> str:
        return self.fingerprint.index_type

    @property
    def ntotal(self) -> int:
        return self.backend.size if isinstance(self.backend, TokenStore) else int(self.backend.ntotal)

    def queries(self, tokens: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Generation-time queries (see `neighbourhood.query_vectors`): tokens [B, t] -> ([B, D], usable [B])."""
        return query_vectors(tokens, step, self.grid, self.codebook, self.spec)

    def retrieve(self, tokens: torch.Tensor, step: int, k: int, distinct: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """One generation step for a batch: tokens [B, t] generated so far -> (tokens [B, k] long, distances [B, k])
        of `search(queries, k, distinct, salt=step)` for raster position `step`, one search for all rows; where the
        edge policy leaves the position without a usable key (the same for every row), -1 / inf throughout."""
        if self.spec.edge_policy == "skip" and not query_cells(step, self.grid, self.spec, tokens.shape[1])[2]:
            return torch.full((len(tokens), k), -1, dtype=torch.long), torch.full((len(tokens), k), float("inf"))
        if isinstance(self.backend, TokenStore):
            return self.backend.search_at(tokens, step, self.grid, k, distinct)
        return self.search(self.queries(tokens, step)[0], k, distinct, salt=step)

    def grid_queries(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forcing queries of whole grids: tokens [B, h, w] -> ([B, h * w, D], usable [h * w])."""
        return grid_queries(tokens, self.codebook, self.spec)

    # ------------------------------------------------------------------------------------------- search
    @property
    def nprobe(self) -> int | None:
        """Lists visited per query (ivfpq, tokens); None for flat."""
        if isinstance(self.backend, TokenStore):
            return self.backend.nprobe
        return get_nprobe(self.backend) if self.kind == "ivfpq" else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if isinstance(self.backend, TokenStore):
            self.backend.set_nprobe(value)
        elif self.kind == "ivfpq":
            set_nprobe(self.backend, value, self.on_gpu)
        else:
            raise ValueError(f"nprobe applies to ivfpq and tokens indexes, not {self.kind}")

    def search(self, queries: torch.Tensor, k: int, distinct: str | None = None, salt: int | torch.Tensor = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, D] float32 -> (tokens [B, k] long, -1 for none; squared L2 distances [B, k] float32): the
        selection `distinct` (module docstring), ties drawn with seeds from each query and `salt` (int or [B])."""
        tokens, distances, _ = self.search_patches(queries, k, distinct, salt)
        return tokens, distances

    def search_patches(self, queries: torch.Tensor, k: int, distinct: str | None = None,
                       salt: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As `search`, plus the patch ids [B, k] long (-1 for none; -1 throughout unless `distinct` is None)."""
        queries = torch.as_tensor(queries, dtype=torch.float32).cpu()
        dimension = self.spec.slots * self.codebook.shape[1]
        if queries.ndim != 2 or queries.shape[1] != dimension:
            raise ValueError(f"queries must be [B, {dimension}], got {list(queries.shape)}")
        if isinstance(self.backend, TokenStore):
            return self.backend.search(queries, k, distinct, salt)
        salts = torch.as_tensor(salt, dtype=torch.long).cpu().expand(len(queries)).contiguous().numpy()
        seeds = scan.query_seeds(np.ascontiguousarray(queries.numpy()), salts)
        tokens = torch.full((len(queries), k), -1, dtype=torch.long)
        distances = torch.full((len(queries), k), float("inf"))
        ids = torch.full((len(queries), k), -1, dtype=torch.long)
        rows, fetch = torch.arange(len(queries)), min(2 * k, self.ntotal)
        while len(rows) and fetch:  # fetch more for rows whose last neighbour may tie with the boundary
            found_tokens, found_distances, found_ids = self._faiss_search(queries[rows], fetch)
            *chosen, boundary = (torch.from_numpy(x) for x in scan.select_found(
                found_distances.numpy(), found_tokens.numpy(), found_ids.numpy(), seeds[rows.numpy()], k,
                scan.MODES[distinct], len(self.codebook)))
            done = (found_distances[:, -1] > boundary) | (found_ids[:, -1] < 0) | (fetch >= self.ntotal)
            tokens[rows[done]], distances[rows[done]], ids[rows[done]] = (x[done] for x in chosen)
            rows, fetch = rows[~done], min(4 * fetch, self.ntotal)
        return tokens, distances, ids

    def _faiss_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        found = min(k, self.ntotal)
        tokens = torch.full((len(queries), k), -1, dtype=torch.long)
        distances = torch.full((len(queries), k), float("inf"))
        ids = torch.full((len(queries), k), -1, dtype=torch.long)
        if found == 0 or len(queries) == 0:
            return tokens, distances, ids
        d, i = self.backend.search(np.ascontiguousarray(queries.numpy()), found)
        i = torch.from_numpy(i)
        valid = i >= 0
        values = torch.from_numpy(self.grids.reshape(-1)[i.clamp_min(0).numpy()].astype(np.int64))
        tokens[:, :found] = torch.where(valid, values, -1)
        distances[:, :found] = torch.where(valid, torch.from_numpy(d), float("inf"))
        ids[:, :found] = torch.where(valid, i, -1)
        return tokens, distances, ids

    # ------------------------------------------------------------------------------------------- provenance
    def patch_source(self, patch_ids: torch.Tensor) -> list[tuple[str, str, int, int]]:
        """(source name, image id, row, column) of each patch id (for analysis)."""
        cells = self.grid * self.grid
        result = []
        for patch in torch.as_tensor(patch_ids).flatten().tolist():
            image, position = divmod(int(patch), cells)
            result.append((self.sources[int(self.image_source[image])], str(self.image_ids[image]),
                           *divmod(position, self.grid)))
        return result
