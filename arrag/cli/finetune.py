"""Fine-tuning subcommands: RA-CM3, FAiD's retrievals and blenders, FAiD on a Show-o backbone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from arrag.cli.options import (
    config_default,
    device_option,
    finetune_default,
    precision_option,
    resolve_device,
    showo_tokenizer_options,
    tokens_option,
)


def _finetune_config(args: argparse.Namespace):
    from arrag.training.finetune import FinetuneConfig

    return FinetuneConfig(epochs=args.epochs, global_batch=args.global_batch, micro_batch=args.micro_batch,
                          lr=args.lr, warmup_fraction=args.warmup_fraction, lora_rank=args.lora_rank,
                          lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          train_generation_head=not args.freeze_generation_head, precision=args.precision,
                          seed=args.seed)


def _finetune_device(name: str) -> str:
    """The device of this process; under torchrun (several GPUs) it joins the process group first."""
    from arrag.training.finetune import init_distributed

    return init_distributed(resolve_device(name))


def _print_finetune(metrics: dict) -> None:
    print(f"loss {metrics['loss_first']:.3f} -> {metrics['loss_last']:.3f} in {metrics['optimizer_steps']} steps "
          f"({metrics['train_seconds']:.0f} s)")


def cmd_finetune_racm3(args: argparse.Namespace) -> None:
    from arrag.racm3 import RACM3Config, finetune_racm3

    config = RACM3Config(top_n=args.top_n, caption_dropout=args.caption_dropout, finetune=_finetune_config(args))
    metrics = finetune_racm3(args.backbone, args.images, args.clip_index, args.out, args.checkpoint, config,
                             _finetune_device(args.device), args.revision or None, args.tokens)
    _print_finetune(metrics)
    if "retrieval" in metrics:
        print(f"retrieval top-1 shows the caption's objects: {metrics['retrieval']['top1_objects']:.3f} "
              f"(chance {metrics['retrieval']['chance_objects']:.3f})")


def cmd_precompute_retrievals(args: argparse.Namespace) -> None:
    from arrag.faid.train import precompute_retrievals

    summary = precompute_retrievals(args.index, args.backbone, args.images, args.k, args.shard, args.shards, args.out,
                                    resolve_device(args.device), args.revision or None, tokens_file=args.tokens,
                                    max_images=args.max_images)
    print(json.dumps(summary))


def cmd_finetune_faid(args: argparse.Namespace) -> None:
    from arrag.faid.augment import FAiDSettings
    from arrag.faid.train import finetune_faid

    settings = FAiDSettings(hops=args.hops, m=args.num_blenders, k=args.k, init=args.init)
    metrics = finetune_faid(args.backbone, args.images, args.retrievals, args.out, args.checkpoint, settings,
                            _finetune_config(args), args.caption_dropout, _finetune_device(args.device),
                            args.revision or None, args.max_images)
    _print_finetune(metrics)
    print(f"blenders on layers {metrics['layers']}: {metrics['blender_parameters']} parameters")


def cmd_finetune_showo_faid(args: argparse.Namespace) -> None:
    from arrag.faid.augment import FAiDSettings
    from arrag.masked import finetune_masked_faid

    settings = FAiDSettings(hops=args.hops, m=args.num_blenders, k=args.k, init=args.init)
    metrics = finetune_masked_faid(args.backbone, args.images, args.index, args.out, args.checkpoint, settings,
                                   _finetune_config(args), args.caption_dropout, args.max_images, args.noise_draws,
                                   _finetune_device(args.device), args.tokens, args.tokenizer or None,
                                   args.tokenizer_revision or None, args.text_tokenizer or None)
    _print_finetune(metrics)
    print(f"blenders on layers {metrics['layers']}: {metrics['blender_parameters']} parameters")


def _finetune_options(parser: argparse.ArgumentParser, key: str) -> None:
    """Options of the shared fine-tuning loop (`arrag.training.finetune.FinetuneConfig`): defaults from the schema's
    fine-tuning settings (the paper's), the caption dropout from config key `key`.caption_dropout. (Read from the
    schema, not from FinetuneConfig: importing torch to build the parser would cost every command seconds.)"""
    parser.add_argument("--backbone", required=True, help="hub id or local folder of the backbone")
    parser.add_argument("--revision", default="", help="pinned hub revision (empty: none)")
    parser.add_argument("--images", required=True, type=Path, help="fine-tuning split (images + annotations.jsonl)")
    tokens_option(parser)
    parser.add_argument("--out", required=True, type=Path, help="weights folder to write")
    parser.add_argument("--checkpoint", required=True, type=Path, help="resumable checkpoint folder")
    device_option(parser)
    parser.add_argument("--caption-dropout", type=float, default=config_default(f"{key}.caption_dropout"))
    parser.add_argument("--epochs", type=float, default=finetune_default("epochs"))
    parser.add_argument("--global-batch", type=int, default=finetune_default("global_batch"))
    parser.add_argument("--micro-batch", type=int, default=finetune_default("micro_batch"))
    parser.add_argument("--lr", type=float, default=finetune_default("lr"))
    parser.add_argument("--warmup-fraction", type=float, default=finetune_default("warmup_fraction"))
    parser.add_argument("--lora-rank", type=int, default=finetune_default("lora_rank"), help="0: no LoRA")
    parser.add_argument("--lora-alpha", type=int, default=finetune_default("lora_alpha"))
    parser.add_argument("--lora-dropout", type=float, default=finetune_default("lora_dropout"))
    parser.add_argument("--freeze-generation-head", action="store_true")
    parser.add_argument("--seed", type=int, default=config_default("seed"))
    precision_option(parser)


def _add_finetune_racm3(parser: argparse.ArgumentParser) -> None:
    _finetune_options(parser, "racm3")
    parser.add_argument("--clip-index", required=True, type=Path, help="build-clip-index output")
    parser.add_argument("--top-n", type=int, default=config_default("racm3.top_n"), help="retrieved images per prompt")


def _add_precompute_retrievals(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, type=Path, help="the patch index")
    parser.add_argument("--backbone", required=True, help="hub id or local folder of the backbone (its VQ)")
    parser.add_argument("--revision", default="", help="pinned hub revision (empty: none)")
    parser.add_argument("--images", required=True, type=Path, help="fine-tuning split (images + annotations.jsonl)")
    tokens_option(parser)
    parser.add_argument("--k", type=int, default=config_default("faid.k"), help="retrieved patches per position")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    _faid_max_images_option(parser)
    device_option(parser)
    parser.add_argument("--out", required=True, type=Path, help=".npz file to write")


def _faid_max_images_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-images", type=int, default=config_default("faid.max_images"),
                        help="the first N fine-tuning images only (0: all)")


def _add_finetune_faid(parser: argparse.ArgumentParser) -> None:
    _finetune_options(parser, "faid")
    parser.add_argument("--hops", required=True, help="blender hop levels, e.g. 1, 2 or 12")
    parser.add_argument("--num-blenders", required=True, type=int, help="number of blender modules m")
    parser.add_argument("--k", type=int, default=config_default("faid.k"), help="retrieved patches per position")
    parser.add_argument("--init", default=config_default("faid.init"), choices=["zero", "official"],
                        help="blender initialisation: zero output convolutions (default) or the official Kaiming")
    _faid_max_images_option(parser)
    parser.add_argument("retrievals", nargs="+", type=Path, help="precompute-retrievals shard files")


def _add_finetune_showo_faid(parser: argparse.ArgumentParser) -> None:
    _finetune_options(parser, "showo.faid")
    showo_tokenizer_options(parser)
    parser.add_argument("--index", required=True, type=Path, help="O-neighbourhood patch index (build-index)")
    parser.add_argument("--hops", required=True, help="blender hop levels, e.g. 1, 2 or 12")
    parser.add_argument("--num-blenders", required=True, type=int, help="number of blender modules m")
    parser.add_argument("--k", type=int, default=config_default("showo.faid.k"),
                        help="retrieved patches per masked position")
    parser.add_argument("--init", default=config_default("faid.init"), choices=["zero", "official"])
    parser.add_argument("--max-images", type=int, default=config_default("showo.faid.max_images"),
                        help="fine-tune on the first N images (0: all)")
    parser.add_argument("--noise-draws", type=int, default=config_default("showo.faid.noise_draws"),
                        help="noised states (time steps) per image, each a training row with its own retrievals")



COMMANDS = {
    "precompute-retrievals": (cmd_precompute_retrievals, "top-k retrievals for every position of the fine-tuning "
                              "images", _add_precompute_retrievals),
    "finetune-faid": (cmd_finetune_faid, "fine-tune FAiD blenders (and LoRA)", _add_finetune_faid),
    "finetune-showo-faid": (cmd_finetune_showo_faid, "fine-tune FAiD blenders on a Show-o backbone (masked decoding)",
                            _add_finetune_showo_faid),
    "finetune-racm3": (cmd_finetune_racm3, "fine-tune the backbone with prepended retrieved images",
                       _add_finetune_racm3),
}
