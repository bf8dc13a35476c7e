"""Vanilla generation throughput (images/s) at several batch sizes, and what the decode loop's extension
points cost when unused. Prints one JSON object.

    python benchmarks/generation_throughput.py [--backbone results/demo/models/backbone] [--batches 1 16]

Without --backbone, a randomly initialised backbone of the Shapes-world size (hidden 256, 4 layers, 8x8
tokens, 512 codes) is built. Timings interleave the variants rep by rep so that machine noise hits them
alike; report ratios measured in one run.
"""

import argparse
import json
import statistics
import time

import torch
from torch import nn

import arrag.models.janus as janus
from arrag.generate import to_images

PROMPTS = ["a photo of a red circle", "two blue squares", "a green star to the left of a yellow triangle",
           "three pink crosses on a dark background"]


class NoOp(nn.Module):
    """A layer module that changes nothing (exercises the FAiD plumbing only)."""

    def forward(self, states, tokens, step):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", help="local backbone folder (default: random Shapes-size backbone)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.backbone:
        backbone = janus.load_backbone(args.backbone)
    else:
        words = " ".join(PROMPTS).split()
        backbone = janus.build_tiny_backbone(words)
    sampling = janus.SamplingConfig(cfg_weight=3.0)
    results = {"backbone": args.backbone or "random shapes-size", "threads": torch.get_num_threads(),
               "image_tokens": backbone.num_image_tokens, "reps": args.reps, "batches": {}}
    for batch in args.batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        seeds = list(range(batch))

        def vanilla(prompts=prompts, seeds=seeds):
            return to_images(backbone, janus.generate_tokens(backbone, prompts, seeds, sampling))

        def with_unused_extensions(prompts=prompts, seeds=seeds):
            tokens = janus.generate_tokens(backbone, prompts, seeds, sampling, prob_hook=lambda p, t, s: p,
                                           layer_modules={0: NoOp()})
            return to_images(backbone, tokens)

        cases = {"vanilla": vanilla, "identity_hook_and_noop_layer_module": with_unused_extensions}
        times = {name: [] for name in cases}
        for function in cases.values():
            function()  # warm-up
        for _ in range(args.reps):
            for name, function in cases.items():
                started = time.perf_counter()
                function()
                times[name].append(time.perf_counter() - started)
        median = {name: statistics.median(values) for name, values in times.items()}
        overhead = median["identity_hook_and_noop_layer_module"] / median["vanilla"]
        results["batches"][str(batch)] = {
            "vanilla_images_per_second": round(batch / median["vanilla"], 2),
            "vanilla_seconds_per_image": round(median["vanilla"] / batch, 5),
            "unused_extensions_over_vanilla": round(overhead, 4),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
