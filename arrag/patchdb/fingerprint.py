"""The index fingerprint: what an index was built from, stored beside it and checked when it is loaded.

An index is only meaningful together with the codebook its keys and queries use, the token grid, the key
definition and the index type; a mismatch (say, an index of another tokenizer) would silently return
garbage, so `check` raises `FingerprintMismatch` naming every differing field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from arrag.patchdb.neighbourhood import KeySpec


class FingerprintMismatch(ValueError):
    pass


def codebook_sha256(codebook: torch.Tensor) -> str:
    """sha256 of a codebook [V, d] as contiguous little-endian float32 bytes (shape included)."""
    array = np.ascontiguousarray(codebook.detach().cpu().float().numpy(), dtype="<f4")
    return hashlib.sha256(f"{array.shape}".encode() + array.tobytes()).hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """Identity of an index. `datasets` holds (name, revision, images, patches) per source; `None` fields of an
    *expected* fingerprint are not checked."""

    codebook_sha256: str
    codebook_size: int
    embed_dim: int
    grid: int
    neighbourhood: str
    hops: str
    key_space: str
    edge_policy: str
    index_type: str | None = None
    datasets: tuple[tuple[str, str, int, int], ...] | None = None
    patches: int | None = None
    exclusions_sha256: str | None = None

    @classmethod
    def expected(cls, codebook: torch.Tensor, grid: int, spec: KeySpec, index_type: str | None = None
                 ) -> Fingerprint:
        """What a caller requires of an index: its codebook [V, d], grid side and key definition."""
        return cls(codebook_sha256=codebook_sha256(codebook), codebook_size=codebook.shape[0],
                   embed_dim=codebook.shape[1], grid=grid, neighbourhood=spec.neighbourhood, hops=spec.hops,
                   key_space=spec.key_space, edge_policy=spec.edge_policy, index_type=index_type)

    @property
    def spec(self) -> KeySpec:
        return KeySpec(self.neighbourhood, self.hops, self.key_space, self.edge_policy)

    def check(self, expected: Fingerprint | None, where: str = "index") -> None:
        """Raise FingerprintMismatch if a non-None field of `expected` differs from this fingerprint."""
        if expected is None:
            return
        wrong = [(f.name, getattr(self, f.name), getattr(expected, f.name)) for f in fields(self)
                 if getattr(expected, f.name) is not None and getattr(expected, f.name) != getattr(self, f.name)]
        if wrong:
            lines = "; ".join(f"{name}: {where} has {have!r}, expected {want!r}" for name, have, want in wrong)
            raise FingerprintMismatch(f"{where} does not match what the caller needs ({lines}); rebuild the index "
                                      "with this codebook and key settings, or load the right one")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["datasets"] = [list(d) for d in self.datasets] if self.datasets is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Fingerprint:
        data = dict(data)
        if data.get("datasets") is not None:
            data["datasets"] = tuple(tuple(d) for d in data["datasets"])
        return cls(**data)

    def write(self, path: str | Path, **extra) -> None:
        """Write the fingerprint (and `extra` metadata) as JSON at `path`, atomically."""
        from evaluators.io import write_json_atomic

        write_json_atomic(path, {"fingerprint": self.to_dict(), **extra})


def read_metadata(path: str | Path) -> tuple[Fingerprint, dict]:
    """The fingerprint and the rest of a JSON written by `Fingerprint.write`."""
    try:
        data = json.loads(Path(path).read_text())
        return Fingerprint.from_dict(data.pop("fingerprint")), data
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a fingerprint file of arrag.patchdb ({type(err).__name__}: {err}); delete it "
                         "and the index or shard beside it and rerun the job that wrote them") from err
