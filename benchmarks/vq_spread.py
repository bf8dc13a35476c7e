"""Spread of the Shapes VQ's quality over seeds, thread counts and precisions, at a config's settings: the
measurements behind the `shapes_models.vq.min_*` floors. Prints one JSON object (every run, and min / median / max
per measure).

    python benchmarks/vq_spread.py --config config/demo.yaml --seeds 0 1 2 3 4 --threads 1 2 --precisions bf16 fp32

Renders the config's database and held-out splits into --work (kept for reruns), then trains one VQ per
(seed, threads, precision) in its own process (`torch.set_num_threads`, so 4 threads on 2 cores means 4), at most
--jobs at a time (one-thread runs side by side barely slow each other on 2 cores). A precision the CPU computes
only by emulation (bf16 without AVX512-BF16 / AMX) is skipped and said so.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from arrag.config import load  # noqa: E402
from arrag.precision import cpu_has_native_bf16  # noqa: E402
from evaluators.record import cpu_model  # noqa: E402

TRAIN = """
import json, sys, torch
from arrag.training.vq import VQTrainConfig, train_vq
torch.set_num_threads({threads})
config = VQTrainConfig(**json.loads(sys.argv[1]))
metrics = train_vq(sys.argv[2], sys.argv[3], sys.argv[4], config, heldout_dir=sys.argv[5])
print(json.dumps(metrics))
"""


def render(config: dict, work: Path) -> None:
    """The database and held-out splits of `config`, unless already in `work`."""
    from arrag.shapes.dataset import ShapesConfig, write_split

    world = ShapesConfig(seed=config["seed"], image_size=config["shapes"]["image_size"])
    for split in ("database", "heldout"):
        if not (work / split / "annotations.jsonl").is_file():
            write_split(work / split, split, config["shapes"]["splits"][split], world)


def train(work: Path, settings: dict, seed: int, threads: int, precision: str) -> dict:
    name = f"seed{seed}_t{threads}_{precision}"
    out, checkpoint = work / "runs" / name, work / "runs" / f"{name}.pt"
    checkpoint.unlink(missing_ok=True)
    config = {**settings, "seed": seed, "precision": precision}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", TRAIN.format(threads=threads), json.dumps(config),
                             str(work / "database"), str(out), str(checkpoint), str(work / "heldout")],
                            env=env, capture_output=True, text=True, check=True)
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    detector = metrics["heldout_detector"]
    run = {"seed": seed, "threads": threads, "precision": precision,
           "wall_seconds": round(time.perf_counter() - started), "train_seconds": metrics["train_seconds"],
           "heldout_psnr": round(metrics["heldout_psnr"], 3),
           "background_psnr": round(metrics["background_psnr"], 3), "recall": detector["recall"],
           "color_accuracy": detector["color_accuracy"], "precision_detector": detector["precision"]}
    print(json.dumps(run), file=sys.stderr, flush=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "config" / "demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["bf16", "fp32"])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (their threads add up)")
    parser.add_argument("--work", type=Path, default=Path("results/vq_spread"))
    args = parser.parse_args()
    config = load(args.config)
    vq = config["shapes_models"]["vq"]
    size = config["shapes"]["image_size"]
    settings = {"image_size": size, "grid": size // 8, "codebook_size": vq["codebook_size"], "steps": vq["steps"],
                "batch_size": vq["batch_size"], "lr": vq["lr"], "object_weight": vq["object_weight"]}
    precisions = [p for p in args.precisions if p != "bf16" or cpu_has_native_bf16()]
    skipped = sorted(set(args.precisions) - set(precisions))
    render(config, args.work)
    cells = [(s, t, p) for t in args.threads for p in precisions for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda cell: train(args.work, settings, *cell), cells))
    summary = {}
    for measure in ("heldout_psnr", "background_psnr", "recall", "color_accuracy", "precision_detector"):
        values = [r[measure] for r in runs]
        summary[measure] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    print(json.dumps({"config": str(args.config), "vq": settings, "cpu": cpu_model(), "skipped_precisions": skipped,
                      "runs": runs, "summary": summary}))


if __name__ == "__main__":
    main()
