"""DAiD: distribution augmentation in decoding (paper §3.2, Eq. 2-4), training-free.

At every decoding step the already generated neighbours of the next position form a query (codebook
vectors of their tokens, the space the index keys live in); the index returns the top-k patches, kept once per
distinct token at its nearest patch's distance as the official retriever keeps them (`DAiDSettings.retrieval`),
whose tokens get a retrieval distribution over the codebook (softmax of -distance / tau over the retrieved
tokens, zero elsewhere; distances as the index returns them, i.e. squared L2), and the model's
distribution -- after classifier-free guidance and temperature, as the official code mixes -- becomes

    p = (1 - lambda) * p_model + lambda * p_retrieval.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from arrag.patchdb.fingerprint import Fingerprint
from arrag.patchdb.index import PatchIndex


def merge_distributions(p_model: torch.Tensor, tokens: torch.Tensor, distances: torch.Tensor, tau: float,
                        lam: float) -> torch.Tensor:
    """Eq. 2-4 for a batch.

    p_model: [B, V] probabilities (rows sum to 1). tokens: [B, K] long retrieved tokens, -1 = invalid (ignored).
    distances: [B, K] float, squared L2 as the index returns them. tau: retrieval temperature. lam: weight of
    the retrieval distribution. Returns [B, V] probabilities whose rows sum to 1. The softmax runs over the
    valid entries of a row; a token retrieved more than once receives the sum of its weights; a row with no
    valid token returns p_model unchanged.
    """
    valid = tokens >= 0
    logits = torch.where(valid, distances.double() / -tau, float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # a row without a valid token: NaN -> 0
    merged = p_model.double() * (1.0 - lam)
    merged.scatter_add_(1, tokens.clamp(min=0), weights * lam)
    return torch.where(valid.any(dim=-1, keepdim=True), merged.to(p_model.dtype), p_model)


RETRIEVALS = ("patches", "distinct_tokens")


@dataclass(frozen=True)
class DAiDSettings:
    """k, retrieval temperature tau and weight lam of Eq. 2-4, and what the retrieval distribution is made of
    (`arrag.patchdb.scan`): ``patches`` (the paper and the official code), the distinct tokens of the k nearest
    patches, each at its nearest patch (official k: 2048); ``distinct_tokens`` (ours, opt-in), the k nearest
    distinct tokens."""

    k: int = 2048
    tau: float = 1.0
    lam: float = 0.3
    retrieval: str = "patches"

    def __post_init__(self) -> None:
        if self.retrieval not in RETRIEVALS:
            raise ValueError(f"DAiD retrieval {self.retrieval!r}: choose one of {RETRIEVALS}")


class DAiDHook:
    """The decode loop's `prob_hook` (see `arrag.models.janus`): at step t, one index search for the whole
    batch with the queries built from the tokens generated so far, then `merge_distributions`. Both CFG
    halves share the query (it depends only on generated tokens), so retrieval runs once per image.
    Positions the index's edge policy leaves without a usable neighbourhood keep the model's distribution.

    With `overlap` the search of step t starts in a worker thread when the loop announces the step
    (`prefetch`), so it runs while the model computes step t's forward; the result is the same either way.
    That pays when the forward leaves the host's cores free, as a GPU forward does while the host waits for
    it (the tokens index searches without the GIL); on CPU the forward already uses every core:
    `benchmarks/decode_overhead.py` at Shapes scale, batch 1, 2 cores, measured a median of +18 % (overlap)
    against +14 % (serial) over six runs, so the CLI overlaps on CUDA only.
    `seconds` accumulates the time spent retrieving (in whichever thread), for the generation record."""

    def __init__(self, index: PatchIndex, settings: DAiDSettings, overlap: bool = False):
        self.index, self.settings, self.seconds = index, settings, 0.0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daid") if overlap else None
        self._pending: tuple[int, Future] | None = None
        if overlap:  # the decode loop calls `prefetch` only when the hook has one: nothing to do per step otherwise
            self.prefetch = self._prefetch

    def _retrieve(self, tokens: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        found = self.index.retrieve(tokens, step, self.settings.k, self.settings.retrieval)
        self.seconds += time.perf_counter() - started
        return found

    def _prefetch(self, tokens: torch.Tensor, step: int) -> None:
        self._pending = (step, self._worker.submit(self._retrieve, tokens, step))

    def __call__(self, probs: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == step:
            retrieved, distances = pending[1].result()
        else:
            retrieved, distances = self._retrieve(tokens, step)
        return merge_distributions(probs, retrieved.to(probs.device), distances.to(probs.device),
                                   self.settings.tau, self.settings.lam)


def load_index_for(backbone_vq: torch.nn.Module, path: str | Path) -> PatchIndex:
    """The patch index at `path`, refused unless it was built with this backbone's codebook vectors
    (`codebook_vectors(normalized=True)`)."""
    from arrag.models.vq import codebook_vectors
    from arrag.patchdb.fingerprint import read_metadata
    from arrag.patchdb.index import metadata_path

    stored, _ = read_metadata(metadata_path(path))
    codebook = codebook_vectors(backbone_vq, normalized=True).detach().float().cpu()
    return PatchIndex.load(path, expected=Fingerprint.expected(codebook, stored.grid, stored.spec))


def parse_variant(variant: str, selection: str | Path | None) -> dict:
    """An ablation cell name like 'lam0.3_tau1.0' -> {'lam': 0.3, 'tau': 1.0}; 'selected' reads the
    selection record written by `arrag select`."""
    if variant == "selected":
        if selection is None:
            raise ValueError("variant 'selected' needs the selection record (--selection)")
        return json.loads(Path(selection).read_text())["values"]
    match = re.fullmatch(r"lam([0-9.]+)_tau([0-9.]+)", variant)
    if match is None:
        raise ValueError(f"DAiD variant {variant!r} is neither 'selected' nor like 'lam0.3_tau1.0'")
    return {"lam": float(match.group(1)), "tau": float(match.group(2))}
