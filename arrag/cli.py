"""The `arrag` command line: one subcommand per workflow step; the Snakemake rules are thin calls of these.

A subcommand whose capability has not landed yet is listed with its help text and exits with
"not implemented yet: <capability>" (status 3) without writing any output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arrag import __version__
from evaluators.io import write_json_atomic


def cmd_shapes_world(args: argparse.Namespace) -> None:
    from arrag.shapes.dataset import ShapesConfig, write_split

    config = ShapesConfig(seed=args.seed, image_size=args.image_size, supersample=args.supersample)
    write_split(args.out, args.split, args.count, config)


def cmd_shapes_benchmarks(args: argparse.Namespace) -> None:
    from arrag.shapes.benchmarks import BenchmarkSizes, write_benchmarks
    from arrag.shapes.dataset import ShapesConfig, read_annotations

    config = ShapesConfig(seed=args.seed, image_size=args.image_size, supersample=args.supersample)
    sizes = BenchmarkSizes(args.geneval_per_tag, args.dpg_prompts, args.mjhq_images)
    write_benchmarks(args.out, config, sizes, args.heldout, read_annotations(args.heldout))


def cmd_train_vq(args: argparse.Namespace) -> None:
    from arrag.training.vq import VQTrainConfig, train_vq

    config = VQTrainConfig(image_size=args.image_size, grid=args.image_size // 8, codebook_size=args.codebook_size,
                           steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    metrics = train_vq(args.images, args.out, args.checkpoint, config, heldout_dir=args.heldout)
    print(f"held-out PSNR {metrics.get('heldout_psnr', float('nan')):.2f} dB after {metrics['steps']} steps "
          f"({metrics['train_seconds']:.0f} s)")


def cmd_train_lm(args: argparse.Namespace) -> None:
    from arrag.training.lm import LMTrainConfig, train_lm

    config = LMTrainConfig(hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
                           intermediate_size=args.intermediate_size, steps=args.steps, batch_size=args.batch_size,
                           lr=args.lr, caption_dropout=args.caption_dropout, seed=args.seed)
    metrics = train_lm(args.images, args.vq, args.out, args.checkpoint, config)
    print(f"final loss {metrics['final_loss_last50']:.3f} after {metrics['steps']} steps "
          f"({metrics['train_seconds']:.0f} s, {metrics['trainable_parameters']} trainable parameters)")


METHODS_NOT_YET = {"daid": "DAiD generation (DAiD issue)", "faid": "FAiD generation (FAiD issue)",
                   "racm3": "RA-CM3 generation (RA-CM3 issue)"}


def cmd_generate(args: argparse.Namespace) -> int:
    from arrag.generate import gather_records, generate_shard

    if args.gather:
        record = gather_records(args.shard_records, args.record, args.images)
        print(f"{record['images']} images, {record['generation_seconds']:.1f} s of generation")
        return 0
    if args.method in METHODS_NOT_YET:
        print(f"not implemented yet: {METHODS_NOT_YET[args.method]}", file=sys.stderr)
        return 3
    import torch

    from arrag.models.janus import SamplingConfig, load_backbone

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_backbone(args.backbone, revision=args.revision or None, device=device)
    sampling = SamplingConfig(cfg_weight=args.cfg_weight, temperature=args.temperature, top_k=args.top_k or None,
                              top_p=args.top_p if args.top_p < 1 else None)
    record = generate_shard(backbone, args.benchmark, args.prompts, args.images, args.shard, args.shards, args.seed,
                            sampling, args.micro_batch, args.samples_per_prompt, args.ablation_subset, args.method,
                            args.variant)
    write_json_atomic(args.record, record)
    print(f"shard {args.shard}/{args.shards}: {record['images_generated']} generated, "
          f"{record['images_skipped']} already there, {record['generation_seconds']:.1f} s")
    return 0


def cmd_stages(args: argparse.Namespace) -> None:
    width = max(len(name) for name in COMMANDS)
    for name, (function, _help, capability, _add) in COMMANDS.items():
        state = "ready" if function is not None else "not implemented yet"
        print(f"{name:<{width}}  {state:<19}  {capability}")


def _shapes_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--supersample", type=int, default=4, help="anti-aliasing factor (default 4)")


def _add_shapes_world(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", required=True, choices=["database", "train", "heldout"])
    parser.add_argument("--count", required=True, type=int, help="number of images")
    parser.add_argument("--out", required=True, type=Path, help="split folder to write")
    _shapes_options(parser)


def _add_shapes_benchmarks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heldout", required=True, type=Path, help="held-out split folder (MJHQ references)")
    parser.add_argument("--out", required=True, type=Path, help="benchmark folder to write")
    parser.add_argument("--geneval-per-tag", type=int, default=12)
    parser.add_argument("--dpg-prompts", type=int, default=40)
    parser.add_argument("--mjhq-images", type=int, default=300)
    _shapes_options(parser)


def _add_train_vq(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="split folder to train on (images/*.png)")
    parser.add_argument("--heldout", type=Path, help="split folder for the reconstruction PSNR")
    parser.add_argument("--out", required=True, type=Path, help="model folder to write (save_pretrained)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="resumable checkpoint file (kept on failure)")
    parser.add_argument("--image-size", type=int, default=64, help="image side; the token grid is a 1/8 of it")
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)


def _add_train_lm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="train split folder (images + annotations)")
    parser.add_argument("--vq", required=True, type=Path, help="trained Shapes VQ folder")
    parser.add_argument("--out", required=True, type=Path, help="backbone folder to write (save_pretrained)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="resumable checkpoint file (kept on failure)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)


def _add_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", choices=["geneval", "dpg", "mjhq", "mjhq_ablation"])
    parser.add_argument("--prompts", type=Path, help="GenEval metadata jsonl, DPG prompt folder or MJHQ meta_data.json")
    parser.add_argument("--method", default="vanilla", choices=["vanilla", "racm3", "daid", "faid"])
    parser.add_argument("--variant", default="default", help="ablation cell or 'default' / 'selected'")
    parser.add_argument("--backbone", help="hub id or local folder of the backbone")
    parser.add_argument("--revision", default="", help="pinned hub revision (empty: none)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg-weight", type=float, default=5.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most probable tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--micro-batch", type=int, default=16, help="images decoded together (fixed per run)")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="GenEval samples per prompt")
    parser.add_argument("--ablation-subset", type=int, default=0, help="mjhq_ablation: number of prompts")
    parser.add_argument("--images", required=True, type=Path, help="output image folder (shared by the shards)")
    parser.add_argument("--record", required=True, type=Path, help="provenance record (JSON) to write")
    parser.add_argument("--gather", action="store_true", help="merge the shard records given as arguments")
    parser.add_argument("shard_records", nargs="*", type=Path, help="with --gather: the shard records")


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


# name -> (function or None when not implemented yet, help, capability and owning issue, add_arguments)
COMMANDS = {
    "shapes-world": (cmd_shapes_world, "render one split of the Shapes world", "Shapes world (Foundation)",
                     _add_shapes_world),
    "shapes-benchmarks": (cmd_shapes_benchmarks, "write GenEval / DPG-Bench / MJHQ files of the Shapes world",
                          "Shapes benchmarks (Foundation)", _add_shapes_benchmarks),
    "stages": (cmd_stages, "list every subcommand and whether it is implemented", "status (Foundation)",
               _no_arguments),
    "fetch": (None, "download pinned datasets, models and benchmark files into resources/",
              "data acquisition (Paper-scale issue)", _no_arguments),
    "train-vq": (cmd_train_vq, "train the Shapes VQ tokenizer (a tiny JanusVQVAE)",
                 "Shapes VQ training (Backbones issue)", _add_train_vq),
    "train-lm": (cmd_train_lm, "train the Shapes Janus language model over the Shapes VQ",
                 "Shapes backbone training (Backbones issue)", _add_train_lm),
    "train-clip": (None, "train the Shapes CLIP", "Shapes CLIP (RA-CM3 issue)", _no_arguments),
    "encode-patches": (None, "encode one shard of database images into patch keys and values",
                       "patch database (Patch database issue)", _no_arguments),
    "train-index": (None, "train the FAISS index", "FAISS index (Patch database issue)", _no_arguments),
    "add-shard": (None, "add one shard of patches to the trained index", "FAISS index (Patch database issue)",
                  _no_arguments),
    "merge-index": (None, "merge the per-shard indexes", "FAISS index (Patch database issue)", _no_arguments),
    "retrieval-analysis": (None, "Figure 6: distance of the k-th retrieved token to the ground truth",
                           "retrieval analysis (Patch database issue)", _no_arguments),
    "build-clip-index": (None, "image-level CLIP index for RA-CM3", "RA-CM3 retrieval (RA-CM3 issue)", _no_arguments),
    "precompute-retrievals": (None, "top-k retrievals for every position of the fine-tuning images",
                              "FAiD training data (FAiD issue)", _no_arguments),
    "finetune-faid": (None, "fine-tune FAiD blenders (and LoRA)", "FAiD fine-tuning (FAiD issue)", _no_arguments),
    "finetune-racm3": (None, "fine-tune the backbone with prepended retrieved images",
                       "RA-CM3 fine-tuning (RA-CM3 issue)", _no_arguments),
    "generate": (cmd_generate, "generate one shard of a benchmark with one method, or --gather the shards",
                 "generation (Backbones issue)", _add_generate),
    "select": (None, "pick ablation values with the lowest FID", "hyperparameter selection (DAiD issue)",
               _no_arguments),
    "tables": (None, "render Tables 1-4 and Figure 7 from result records", "tables (Paper-scale issue)",
               _no_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arrag", description="AR-RAG benchmark harness.")
    parser.add_argument("--version", action="version", version=f"arrag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (function, help_text, capability, add_arguments) in COMMANDS.items():
        suffix = "" if function is not None else f" [not implemented yet: {capability}]"
        command_parser = sub.add_parser(name, help=help_text + suffix, description=help_text + suffix)
        add_arguments(command_parser)
        command_parser.set_defaults(function=function, capability=capability)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.function is None:
        print(f"not implemented yet: {args.capability}", file=sys.stderr)
        return 3
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.function(args) or 0


if __name__ == "__main__":
    sys.exit(main())
