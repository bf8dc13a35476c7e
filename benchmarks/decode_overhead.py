"""Decode-time overhead of DAiD and FAiD over vanilla generation, measured in one run. Prints one JSON object.

    OMP_NUM_THREADS=2 python benchmarks/decode_overhead.py --scale janus-pro-1b
    OMP_NUM_THREADS=2 python benchmarks/decode_overhead.py --scale shapes \\
        [--backbone results/demo/models/backbone --index results/demo/index/index.faiss \\
         --faid results/demo/models/faid/hops12_m2]

Batch 1 with classifier-free guidance (2 rows), CPU, variants interleaved rep by rep so that machine noise hits
them alike; the figure of merit is the ratio of median seconds per image to vanilla's.

* ``janus-pro-1b``: the Janus-Pro-1B architecture with random weights built from its configuration (no
  download): Llama hidden 2048, 24 layers, 16 heads, FFN 5632; 16384 codes of 8 dims; generation head
  2048 -> 2048 -> 16384. The token grid is 6 x 6 instead of 24 x 24, so an image is 36 real decode steps ("a
  few dozen"): a step costs the same weights and blender work at either grid, only attention reads a shorter
  cache. The patch index is a tokens index (the harness's default type) over `--patches` patches (default 10M)
  of random token grids, where every key is distinct (the least favourable case for that index).
* ``shapes``: the given trained backbone / index / FAiD weights, or random ones of the demo's size (hidden 256,
  4 layers, 8 x 8 tokens, 512 codes) with an index over random grids.

DAiD: k = 2048 patches at Janus scale (the official value) and codebook / 8 at Shapes scale, their distinct tokens
(``--daid-retrieval patches``, the official selection; ``distinct_tokens``: the k nearest distinct tokens), lambda
0.3, tau 1; ``daid_overlap`` runs each step's search in a worker thread during that step's forward (what the
CLI does on CUDA), ``daid`` runs it after the forward (the CPU default). FAiD: hops 12, m 2, k 10 (official),
random blender weights unless --faid is given (the cost does not depend on trained values); the fast path with
the composed kernels and the token table. The time FAiD spends preparing those caches (once per loaded model)
is reported apart, and so is the number of tokens each retrieval returns per step (mean, p10, p90 over the steps of
the vanilla image, at k = 2048 and at DAiD's k, for both selections). Parameter counts: the base model, and what
FAiD fine-tunes with the paper's settings (blenders, LoRA r = 128 on q/v, generation head).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

import arrag.models.janus as janus
from arrag.daid import DAiDHook, DAiDSettings, load_index_for
from arrag.faid.augment import FAiD, FAiDSettings, index_retriever
from arrag.models.vq import codebook_vectors
from arrag.patchdb.fingerprint import Fingerprint
from arrag.patchdb.index import PatchIndex
from arrag.patchdb.neighbourhood import KeySpec, codebook_keys, neighbours
from arrag.patchdb.token_index import TokenStore, train_lists
from arrag.training.finetune import FinetuneConfig

PROMPTS = ["a photo of a red circle", "two blue squares", "a green star to the left of a yellow triangle"]
JANUS_PRO_1B = dict(image_size=96, patch_size=16, codebook_size=16384, hidden_size=2048, num_layers=24, num_heads=16,
                    intermediate_size=5632)
SHAPES_DEMO = dict(image_size=64, patch_size=8, codebook_size=512, hidden_size=256, num_layers=4, num_heads=4,
                   intermediate_size=512)


def random_index(backbone: janus.JanusBackbone, patches: int, seed: int) -> PatchIndex:
    """A tokens index (1-hop L keys in codebook space, zero edge policy) over random token grids."""
    rng = np.random.default_rng(seed)
    codebook = codebook_vectors(backbone.vq, normalized=True).detach().float()
    grid = backbone.grid_size
    spec = KeySpec("L", "1", "codebook", "zero")
    grids = rng.integers(0, len(codebook), size=(-(-patches // grid ** 2), grid, grid))
    tokens = torch.from_numpy(grids)
    slots = neighbours(tokens, spec, -1).flatten(0, 2).numpy()
    nlist = round(len(slots) ** 0.5)
    sample = rng.choice(len(grids), min(len(grids), -(-40 * nlist // grid ** 2)), replace=False)
    keys = codebook_keys(tokens[sample], codebook, spec).flatten(0, 2).numpy()
    store = TokenStore.build(codebook, spec, train_lists(keys, nlist, seed), slots, grids.reshape(-1),
                             np.arange(len(slots)))
    fingerprint = Fingerprint.expected(codebook, grid, spec, "tokens")
    return PatchIndex(fingerprint, codebook, store, None, np.zeros(0, str), np.zeros(0, np.uint8), [])


def tokens_per_step(index: PatchIndex, tokens: torch.Tensor, k: int, retrieval: str) -> dict:
    """Tokens retrieved at each decode step of generated tokens [1, N]: mean, 10th and 90th percentiles."""
    counts = [int((index.retrieve(tokens[:, :step], step, k, retrieval)[0] >= 0).sum()) for step in
              range(tokens.shape[1])]
    return {"mean": round(float(np.mean(counts)), 1), "p10": float(np.percentile(counts, 10)),
            "p90": float(np.percentile(counts, 90))}


def trainable_parameters(backbone: janus.JanusBackbone, faid: FAiD, config: FinetuneConfig) -> dict:
    """FAiD's trainable parameters as fine-tuned (`arrag.training.finetune`): blenders, LoRA of rank r on the
    targeted projections (r x (in + out) each), generation head; and the model's total with them."""
    lora = sum(config.lora_rank * (module.in_features + module.out_features)
               for name, module in backbone.model.model.language_model.named_modules()
               if name.rsplit(".", 1)[-1] in config.lora_targets)
    head = sum(p.numel() for p in backbone.model.model.generation_head.parameters())
    blenders = sum(p.numel() for p in faid.parameters())
    base = sum(p.numel() for p in backbone.model.parameters())
    return {"base_model": base, "blenders": blenders, "lora": lora, "generation_head": head,
            "trainable": blenders + lora + head, "total_with_faid": base + blenders + lora}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["janus-pro-1b", "shapes"], default="shapes")
    parser.add_argument("--backbone", help="shapes: trained backbone folder (default: random demo-size backbone)")
    parser.add_argument("--index", help="shapes: patch index of that backbone (default: random tokens index)")
    parser.add_argument("--faid", help="shapes: finetune-faid output folder (default: random blenders)")
    parser.add_argument("--patches", type=int, help="patches of the random index (default: 10M, shapes 1M)")
    parser.add_argument("--daid-retrieval", choices=["patches", "distinct_tokens"], default="patches")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    janus_scale = args.scale == "janus-pro-1b"
    started = time.perf_counter()
    if args.backbone and not janus_scale:
        backbone = janus.load_backbone(args.backbone)
    else:
        words = " ".join(PROMPTS).split()
        backbone = janus.build_tiny_backbone(words, **(JANUS_PRO_1B if janus_scale else SHAPES_DEMO))
    backbone.model.eval()
    build_seconds = time.perf_counter() - started
    patches = args.patches or (10_000_000 if janus_scale else 1_000_000)
    started = time.perf_counter()
    index = load_index_for(backbone.vq, args.index) if args.index else random_index(backbone, patches, args.seed)
    index_seconds = time.perf_counter() - started

    codebook_size = len(index.codebook)
    daid_settings = DAiDSettings(k=2048 if janus_scale else codebook_size // 8, tau=1.0, lam=0.3,
                                 retrieval=args.daid_retrieval)
    daid, daid_overlap = DAiDHook(index, daid_settings), DAiDHook(index, daid_settings, overlap=True)
    started = time.perf_counter()
    if args.faid:
        from arrag.faid.train import load_faid

        faid_backbone = janus.load_backbone(args.backbone)
        faid, _ = load_faid(faid_backbone, args.faid)
    else:
        faid_backbone = backbone
        faid = FAiD.for_backbone(backbone, FAiDSettings(hops="12", m=2, k=10))
        faid.prepare_inference(backbone)
    faid_prepare_seconds = time.perf_counter() - started
    faid_modules = faid.decode_modules(faid_backbone, index_retriever(index, faid.settings.k))

    sampling = janus.SamplingConfig(cfg_weight=5.0 if janus_scale else 3.0)
    prompts, seeds = PROMPTS[:1], [0]
    cases = {
        "vanilla": lambda: janus.generate_tokens(backbone, prompts, seeds, sampling),
        "daid": lambda: janus.generate_tokens(backbone, prompts, seeds, sampling, prob_hook=daid),
        "daid_overlap": lambda: janus.generate_tokens(backbone, prompts, seeds, sampling, prob_hook=daid_overlap),
        "faid": lambda: janus.generate_tokens(faid_backbone, prompts, seeds, sampling, layer_modules=faid_modules),
    }
    for function in cases.values():
        function()  # warm-up
    times = {name: [] for name in cases}
    daid.seconds, daid_overlap.seconds, faid.retrieval_seconds = 0.0, 0.0, 0.0
    for _ in range(args.reps):
        for name, function in cases.items():
            begin = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - begin)
    median = {name: statistics.median(values) for name, values in times.items()}
    vanilla_tokens = cases["vanilla"]()
    per_step = {f"k{k}": {retrieval: tokens_per_step(index, vanilla_tokens, k, retrieval)
                          for retrieval in ("patches", "distinct_tokens")} for k in sorted({2048, daid_settings.k})}
    total = {name: sum(values) for name, values in times.items()}
    print(json.dumps({
        "scale": args.scale, "backbone": args.backbone or f"random {args.scale} architecture",
        "index": args.index or f"random tokens index, {index.ntotal} patches", "threads": torch.get_num_threads(),
        "decode_steps": backbone.num_image_tokens, "batch": 1, "reps": args.reps,
        "daid": {"k": daid_settings.k, "retrieval": daid_settings.retrieval, "nprobe": index.nprobe},
        "parameters": trainable_parameters(backbone, faid, FinetuneConfig()), "faid_layers": faid.layers,
        "seconds_per_image": {name: round(value, 4) for name, value in median.items()},
        "overhead_over_vanilla": {name: round(median[name] / median["vanilla"] - 1, 4)
                                  for name in ("daid", "daid_overlap", "faid")},
        "retrieval_share_of_time": {"daid": round(daid.seconds / total["daid"], 4),
                                    "daid_overlap": round(daid_overlap.seconds / total["daid_overlap"], 4),
                                    "faid": round(faid.retrieval_seconds / total["faid"], 4)},
        "retrieved_tokens_per_step": per_step,
        "setup_seconds": {"backbone": round(build_seconds, 1), "index": round(index_seconds, 1),
                          "faid_caches": round(faid_prepare_seconds, 1)},
    }))


if __name__ == "__main__":
    main()
