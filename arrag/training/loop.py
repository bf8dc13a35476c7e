"""Pieces every training loop here shares: deterministic batches, resumable checkpoints, loss logs.

A checkpoint holds everything the next step depends on (model and optimizer state, step, RNG state,
loss history), so resuming from it gives the same weights as an uninterrupted run. Checkpoints are
written atomically with `torch.save` and read with `torch.load(weights_only=True)`; final weights are
saved separately as safetensors by the caller.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict
from pathlib import Path

import torch

from evaluators.io import write_bytes_atomic


def batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the batch used at `step`: epochs are seeded permutations of range(n_items), so a
    step's batch depends only on (n_items, batch_size, step, seed), never on how training was resumed."""
    per_epoch = max(1, n_items // batch_size)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_items, generator=generator)
    return order[position * batch_size:(position + 1) * batch_size]


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator for the randomness inside one step (dropout, masking): a function of (seed, step)."""
    return torch.Generator().manual_seed(seed * 1_000_033 + step + 1)


def save_checkpoint(path: str | Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def warmup_cosine(peak: float, warmup_steps: int, steps: int, step: int) -> float:
    """Learning rate of `step`: linear warm-up to `peak`, then cosine decay to a tenth of it at `steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(optimizer: torch.optim.Optimizer, parameters, loss: torch.Tensor, lr: float,
                   max_grad_norm: float = 1.0) -> None:
    """One update from a scalar loss: set the learning rate, backward, clip the gradient norm, step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()


def load_checkpoint(path: str | Path) -> dict | None:
    """The checkpoint at `path`, or None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def resume(checkpoint: str | Path, config, model: torch.nn.Module, optimizer: torch.optim.Optimizer
           ) -> tuple[LossLog, int, float, dict]:
    """Restore `model` and `optimizer` from a `save_training` checkpoint -> (loss log, next step, seconds spent,
    the whole state for a loop's own entries); (empty log, 0, 0.0, {}) when there is none. A checkpoint written
    with another config (a dataclass) is an error."""
    state = load_checkpoint(checkpoint)
    if state is None:
        return LossLog(), 0, 0.0, {}
    if state["config"] != asdict(config):
        raise ValueError(f"checkpoint {checkpoint} was written with another config; delete it to start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return LossLog(state["log"]), state["step"], state["seconds"], state


def save_training(checkpoint: str | Path, config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  log: LossLog, step: int, seconds: float, **extra) -> None:
    """Everything the next step depends on (see `resume`), plus a loop's own `extra` entries."""
    save_checkpoint(checkpoint, {"config": asdict(config), "model": model.state_dict(),
                                 "optimizer": optimizer.state_dict(), "log": log.rows, "step": step,
                                 "seconds": seconds, **extra})


class LossLog:
    """Loss values per step, written as CSV and plotted as PNG."""

    def __init__(self, rows: list[dict] | None = None):
        self.rows = list(rows or [])

    def add(self, step: int, **values: float) -> None:
        self.rows.append({"step": step, **{k: float(v) for k, v in values.items()}})

    def write_csv(self, path: str | Path) -> None:
        if not self.rows:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(self.rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_bytes_atomic(path, buffer.getvalue().encode())

    def plot(self, path: str | Path, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in self.rows[0] if k != "step"] if self.rows else []
        figure, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3), squeeze=False)
        steps = [r["step"] for r in self.rows]
        for axis, key in zip(axes[0], keys, strict=False):
            axis.plot(steps, [r[key] for r in self.rows], linewidth=1)
            axis.set_xlabel("step")
            axis.set_title(key)
            axis.grid(alpha=0.3)
        figure.suptitle(title)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        write_bytes_atomic(path, buffer.getvalue())

