"""Checkpoint files of the models written in this project (MAGVIT-v2, Show-o): find, read, check, write.

A checkpoint is a directory (local, or a Hugging Face repo at a pinned revision) holding ``config.json`` and the
weights, either one file or shards listed by ``<weights name>.index.json``. Weight names are tried in order:
safetensors first (``model.safetensors``, then the names diffusers' `ModelMixin` writes, which the official Show-o
code uses: ``pytorch_model.safetensors``, ``pytorch_model.bin``), pickles only through
``torch.load(..., weights_only=True)``. Loading is strict: every missing, unexpected or wrongly shaped tensor is
named in one error. Saving writes ``model.safetensors`` + ``config.json``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download, list_repo_files
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
SAVE_NAME = "model.safetensors"
WEIGHT_NAMES = (
    "model.safetensors",
    "pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
)
MAX_NAMED = 20  # keys named per category in a mismatch error


def checkpoint_files(source: str, revision: str | None = None) -> tuple[Path, list[Path]]:
    """(config.json, weight files) of a local directory or a hub repo (`revision` pins a commit)."""
    local = Path(source)
    if local.is_dir():
        available = {p.name for p in local.iterdir()}

        def fetch(name: str) -> Path:
            return local / name
    else:
        try:
            available = set(list_repo_files(source, revision=revision))
        except Exception as err:  # offline, unknown repo or revision: one clear message
            raise FileNotFoundError(
                f"{source!r} is neither a local directory nor a reachable Hugging Face repo (revision {revision!r})"
            ) from err

        def fetch(name: str) -> Path:
            return Path(hf_hub_download(source, name, revision=revision))

    if CONFIG_NAME not in available:
        raise FileNotFoundError(f"{source!r} has no {CONFIG_NAME}")
    for name in WEIGHT_NAMES:
        if name in available:
            return fetch(CONFIG_NAME), [fetch(name)]
        if f"{name}.index.json" in available:
            weight_map = json.loads(fetch(f"{name}.index.json").read_text())["weight_map"]
            return fetch(CONFIG_NAME), [fetch(shard) for shard in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"{source!r} has none of the weight files {WEIGHT_NAMES} (nor their .index.json)")


def check_safetensors(path: str | Path) -> None:
    """Raise ValueError naming `path` unless it is a whole safetensors file: its header parses and the tensor data it
    describes ends where the file does. A file cut short (a killed copy, a full disk) fails here with the fix,
    rather than deep inside a loader; only the header is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        if 8 + length + end != size:
            raise ValueError(f"{size} bytes where the header describes {8 + length + end}")
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: truncated or corrupt safetensors file ({err}); delete {path.parent} and rerun the "
                         "job that wrote it") from err


def check_safetensors_folder(source: str | Path) -> None:
    """`check_safetensors` on every .safetensors file of a local model folder (hub ids: nothing to check here)."""
    folder = Path(source)
    if folder.is_dir():
        for path in sorted(folder.glob("*.safetensors")):
            check_safetensors(path)


def read_checkpoint(source: str, revision: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict on CPU) of a checkpoint; see `checkpoint_files`."""
    config_path, weight_paths = checkpoint_files(source, revision)
    state: dict[str, torch.Tensor] = {}
    for path in weight_paths:
        if path.suffix == ".safetensors":
            check_safetensors(path)
            state.update(load_file(path))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return json.loads(config_path.read_text()), state


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`; raise ValueError naming every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [
        f"{key} {tuple(state[key].shape)} (model {tuple(expected[key].shape)})"
        for key in sorted(expected.keys() & state.keys())
        if state[key].shape != expected[key].shape
    ]
    problems = [
        f"{len(keys)} {what}: {', '.join(keys[:MAX_NAMED])}{' ...' if len(keys) > MAX_NAMED else ''}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", mismatched))
        if keys
    ]
    if problems:
        raise ValueError(f"checkpoint {source!r} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def write_checkpoint(model: nn.Module, config: dict, path: str | Path) -> None:
    """Write `model`'s state dict as safetensors and `config` as JSON into directory `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {key: tensor.detach().contiguous() for key, tensor in model.state_dict().items()}
    save_file(state, path / SAVE_NAME, metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
