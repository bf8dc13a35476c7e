"""Appendix C.1 / Figure 6: how close the k-th retrieved token is to the ground-truth token.

For every position of held-out token grids, the query is built from the ground-truth neighbours exactly as at
generation time (codebook vectors, `PatchIndex.grid_queries`), the top-K patches are retrieved, and the L2
distance between the codebook vectors of the ground-truth token and of the k-th retrieved token is averaged
over positions, for k = 1..K; the baseline is the distance to a uniformly drawn vocabulary code. The CSV also
gives the rate at which the k-th retrieved token is the ground-truth token.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from arrag.patchdb.index import PatchIndex

COLUMNS = ("k", "mean_distance", "mean_random_distance", "match_rate", "positions")


def retrieval_accuracy(index: PatchIndex, tokens: torch.Tensor, k: int = 10, seed: int = 0,
                       batch_size: int = 4096) -> list[dict]:
    """Rows (k, mean distance, mean random distance, match rate, positions) for token grids [n, h, w]."""
    queries, usable = index.grid_queries(tokens.long())
    queries = queries[:, usable].flatten(0, 1)
    truth = tokens.long().flatten(1)[:, usable].flatten()
    retrieved = torch.cat([index.search(queries[i:i + batch_size], k)[0] for i in range(0, len(queries), batch_size)])
    codebook = index.codebook
    generator = torch.Generator().manual_seed(seed)
    random_tokens = torch.randint(len(codebook), truth.shape, generator=generator)
    random_distance = (codebook[truth] - codebook[random_tokens]).norm(dim=-1).mean().item()
    rows = []
    for rank in range(k):
        found = retrieved[:, rank] >= 0
        distance = (codebook[truth[found]] - codebook[retrieved[found, rank]]).norm(dim=-1)
        rows.append({"k": rank + 1, "mean_distance": distance.mean().item() if found.any() else float("nan"),
                     "mean_random_distance": random_distance,
                     "match_rate": (retrieved[found, rank] == truth[found]).float().mean().item() if found.any()
                     else float("nan"), "positions": int(found.sum())})
    return rows


def write_retrieval_accuracy(rows: list[dict], csv_path: str | Path, png_path: str | Path, title: str = "") -> None:
    """The rows as CSV and as a plot (distance against k, retrieved vs random), each written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluators.io import write_bytes_atomic

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: (f"{r[c]:.6f}" if isinstance(r[c], float) else r[c]) for c in COLUMNS} for r in rows)
    write_bytes_atomic(csv_path, text.getvalue().encode())
    ks = np.array([r["k"] for r in rows])
    figure, axis = plt.subplots(figsize=(4.5, 3.2), dpi=150)
    axis.plot(ks, [r["mean_distance"] for r in rows], "o-", label="k-th retrieved token")
    axis.plot(ks, [r["mean_random_distance"] for r in rows], "--", color="grey", label="random token")
    axis.set_xlabel("k")
    axis.set_ylabel("L2 distance to ground-truth token")
    axis.set_ylim(bottom=0)
    axis.set_xticks(ks)
    axis.set_title(title or "Patch retrieval accuracy (Fig. 6)", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    write_bytes_atomic(png_path, buffer.getvalue())
