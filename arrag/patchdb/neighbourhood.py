"""Neighbourhood keys and queries of the patch database (§3.1, Appendix B.2), on token and latent grids.

A patch at grid cell (r, c) is keyed by the vectors of its neighbours, concatenated in raster order
(top-to-bottom, left-to-right). Hop level n is the ring of cells at Chebyshev distance exactly n; a key uses
the union of the rings named in `hops` ("1": the 3x3 ring, "12": both rings = the whole 5x5 window, "2":
the outer ring only).

* ``L`` (causal, autoregressive backbones): only the cells that precede (r, c) in raster order. Hop 1 is
  up-left, up, up-right, left (4 cells, the official AR-RAG key); hops "12" give 12 cells.
* ``O`` (all surrounding cells, masked backbones): hop 1 is the 8 cells around (r, c), hops "12" 24 cells.

Missing neighbours (outside the grid, or tokens marked -1 = not generated yet):

* edge policy ``zero`` (the paper): a missing neighbour is a zero vector; every cell has a key.
* edge policy ``skip`` (the official code): a cell with any out-of-grid neighbour is neither stored nor
  queried (for L hop 1: the first row and the first and last columns).

Key spaces: ``codebook`` keys are the codebook vectors of the neighbours' tokens, the space in which
generation-time queries live (a key built here equals bit for bit the query built from the same tokens);
``latent`` keys are the neighbours' continuous encoder outputs (the official code: L2-normalised latents).
Vectors are float32; a key has ``slots * d`` dimensions (slots = number of neighbour cells).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch

NEIGHBOURHOODS = ("L", "O")
KEY_SPACES = ("codebook", "latent")
EDGE_POLICIES = ("zero", "skip")
MISSING = -1  # token id of a neighbour that is not there (outside the grid or not generated yet)


@dataclass(frozen=True)
class KeySpec:
    """What a key is: neighbourhood shape, hop levels, key space and edge policy (config `index:`)."""

    neighbourhood: str = "L"
    hops: str = "1"
    key_space: str = "codebook"
    edge_policy: str = "zero"

    def __post_init__(self) -> None:
        if self.neighbourhood not in NEIGHBOURHOODS:
            raise ValueError(f"neighbourhood must be one of {NEIGHBOURHOODS}, got {self.neighbourhood!r}")
        if not self.hops or not self.hops.isdigit() or "0" in self.hops:
            raise ValueError(f"hops must be digits 1-9 such as '1' or '12', got {self.hops!r}")
        if self.key_space not in KEY_SPACES:
            raise ValueError(f"key_space must be one of {KEY_SPACES}, got {self.key_space!r}")
        if self.edge_policy not in EDGE_POLICIES:
            raise ValueError(f"edge_policy must be one of {EDGE_POLICIES}, got {self.edge_policy!r}")

    @cached_property
    def offsets(self) -> tuple[tuple[int, int], ...]:
        """The (row, column) offsets of the neighbour cells, in raster order."""
        levels = {int(h) for h in self.hops}
        reach = max(levels)
        cells = [(dr, dc) for dr in range(-reach, reach + 1) for dc in range(-reach, reach + 1)
                 if max(abs(dr), abs(dc)) in levels]
        if self.neighbourhood == "L":
            cells = [(dr, dc) for dr, dc in cells if dr < 0 or (dr == 0 and dc < 0)]
        return tuple(cells)

    @property
    def slots(self) -> int:
        return len(self.offsets)

    @property
    def reach(self) -> int:
        return max(int(h) for h in self.hops)


def usable_cells(grid: int, spec: KeySpec) -> torch.Tensor:
    """[grid, grid] bool: cells that have a key (all of them under `zero`; inner ones under `skip`)."""
    usable = torch.ones(grid, grid, dtype=torch.bool)
    if spec.edge_policy == "skip":
        for dr, dc in spec.offsets:
            rows = torch.arange(grid)[:, None] + dr
            cols = torch.arange(grid)[None, :] + dc
            usable &= (rows >= 0) & (rows < grid) & (cols >= 0) & (cols < grid)
    return usable


def neighbours(values: torch.Tensor, spec: KeySpec, fill: float | int) -> torch.Tensor:
    """The neighbour values of every cell: [B, h, w, *f] -> [B, h, w, slots, *f]; outside cells get `fill`."""
    n = spec.reach
    b, h, w = values.shape[:3]
    padded = values.new_full((b, h + 2 * n, w + 2 * n, *values.shape[3:]), fill)
    padded[:, n:n + h, n:n + w] = values
    return torch.stack([padded[:, n + dr:n + dr + h, n + dc:n + dc + w] for dr, dc in spec.offsets], dim=3)


def vector_table(codebook: torch.Tensor) -> torch.Tensor:
    """[V + 1, d] float32 on CPU: the codebook, then the zero vector, which MISSING (-1) tokens index as row -1."""
    codebook = codebook.detach().float().cpu()
    return torch.cat([codebook, codebook.new_zeros(1, codebook.shape[1])])


def token_vectors(tokens: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Codebook vectors of tokens [...] -> [..., d] float32; MISSING (-1) tokens give zero vectors."""
    return vector_table(codebook)[tokens.long().cpu()]


def codebook_keys(tokens: torch.Tensor, codebook: torch.Tensor, spec: KeySpec) -> torch.Tensor:
    """Codebook-space keys of every cell: token grids [B, h, w] -> [B, h, w, slots * d] float32.

    `codebook` [V, d] is the one queries use (Janus-Pro: the L2-normalised codebook). Tokens may be MISSING.
    """
    vectors = token_vectors(neighbours(tokens.long(), spec, MISSING), codebook)
    return vectors.flatten(3)


def latent_keys(latents: torch.Tensor, spec: KeySpec) -> torch.Tensor:
    """Latent-space keys of every cell: latents [B, h, w, d] -> [B, h, w, slots * d] float32."""
    return neighbours(latents.float(), spec, 0.0).flatten(3)


def grid_queries(tokens: torch.Tensor, codebook: torch.Tensor, spec: KeySpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing: the queries of every position of whole token grids at once.

    tokens [B, h, w] long (MISSING = not known) -> (queries [B, h * w, slots * d] float32, usable [h * w] bool),
    row i of a grid being raster position i. For L neighbourhoods row i uses only tokens before i, so it
    equals `query_vectors(tokens.flatten(1)[:, :i], i, ...)`.
    """
    grid = tokens.shape[1]
    queries = codebook_keys(tokens, codebook, spec).flatten(1, 2)
    return queries, usable_cells(grid, spec).flatten()


def query_vectors(tokens: torch.Tensor, step: int, grid: int, codebook: torch.Tensor,
                  spec: KeySpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Generation-time queries for raster position `step` from the tokens generated so far.

    tokens [B, t] long (raster order; t >= step for L; MISSING = not generated) -> (queries [B, slots * d]
    float32, usable [B] bool). Neighbours outside the grid, at positions >= t, or MISSING are zero vectors;
    `usable` is False where the `skip` edge policy stores no key for this position (then do not retrieve).
    """
    slots, positions, inside = query_cells(step, grid, spec, tokens.shape[1])
    slot_tokens = np.full((len(tokens), spec.slots), MISSING, dtype=np.int64)
    slot_tokens[:, slots] = tokens.cpu().numpy()[:, positions]
    usable = torch.full((len(tokens),), inside or spec.edge_policy == "zero")
    return token_vectors(torch.from_numpy(slot_tokens), codebook).flatten(1), usable


@lru_cache(maxsize=4096)
def query_cells(step: int, grid: int, spec: KeySpec, known: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """For raster position `step` with tokens 0 .. known-1 known: the slots whose neighbour is known, those
    neighbours' raster positions (int64 arrays), and whether every neighbour cell lies inside the grid."""
    row, col = divmod(step, grid)
    slots, positions, inside = [], [], True
    for slot, (dr, dc) in enumerate(spec.offsets):
        r, c = row + dr, col + dc
        if not (0 <= r < grid and 0 <= c < grid):
            inside = False
        elif r * grid + c < known:
            slots.append(slot)
            positions.append(r * grid + c)
    return np.array(slots, dtype=np.int64), np.array(positions, dtype=np.int64), inside
