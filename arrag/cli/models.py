"""Model subcommands: the Shapes world's VQ, backbones (Janus-style, Show-o-style) and CLIP; VQ tokens of a split."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from arrag.cli.options import config_default, device_option, precision_option, resolve_device, tokens_option


def _config_options(parser: argparse.ArgumentParser, key: str, options: dict[str, type]) -> None:
    """--name options whose defaults are config key `key`.<name> (dashes as underscores)."""
    for name, kind in options.items():
        parser.add_argument(f"--{name}", type=kind, default=config_default(f"{key}.{name.replace('-', '_')}"))


def cmd_train_vq(args: argparse.Namespace) -> int:
    from arrag.training.vq import VQTrainConfig, train_vq

    floors = {"min_heldout_psnr": args.min_heldout_psnr, "min_detector_recall": args.min_detector_recall,
              "min_color_accuracy": args.min_color_accuracy}
    if any(floors.values()) and args.heldout is None:
        raise SystemExit("train-vq: the quality floors (--min-*) are measured on --heldout; give a held-out split")
    config = VQTrainConfig(image_size=args.image_size, grid=args.image_size // 8, codebook_size=args.codebook_size,
                           steps=args.steps, batch_size=args.batch_size, lr=args.lr, object_weight=args.object_weight,
                           precision=args.precision, seed=args.seed)
    metrics = train_vq(args.images, args.out, args.checkpoint, config, heldout_dir=args.heldout)
    print(f"{metrics['steps']} steps in {metrics['train_seconds']:.0f} s ({metrics['precision']})")
    if args.heldout is None:
        return 0
    detector = metrics["heldout_detector"]
    measured = {"min_heldout_psnr": metrics["heldout_psnr"], "min_detector_recall": detector["recall"],
                "min_color_accuracy": detector["color_accuracy"]}
    print(f"held-out PSNR {metrics['heldout_psnr']:.2f} dB (background-only fill: {metrics['background_psnr']:.2f} dB);"
          f" Shapes detector on the reconstructions: recall {detector['recall']:.3f}, colour accuracy "
          f"{detector['color_accuracy']:.3f}, precision {detector['precision']:.3f}")
    failed = [f"{key} {floors[key]} (measured {measured[key]:.3f})" for key in floors
              if floors[key] and not measured[key] >= floors[key]]
    if failed:
        print(f"train-vq: below the configured floor of shapes_models.vq.{'; '.join(failed)}; see "
              f"{args.out / 'metrics.json'} and reconstructions.png. The tokenizer bounds every later image: train "
              "longer or change the VQ settings (the floors and their measured spread are in the README)",
              file=sys.stderr)
        return 2
    return 0


def cmd_vq_reconstruct(args: argparse.Namespace) -> None:
    from arrag.training.vq import reconstruct_split

    count = reconstruct_split(args.vq, args.split, args.out, args.limit)
    print(f"{count} reconstructions in {args.out}")


def cmd_tokenize(args: argparse.Namespace) -> None:
    from arrag.patchdb.encode import load_vq, vq_geometry
    from arrag.split_tokens import write_split_tokens
    from arrag.training.finetune import finetune_pairs

    vq = load_vq(args.vq, args.revision or None, image_size=args.size).to(resolve_device(args.device))
    _, _, files = finetune_pairs(args.images)
    summary = write_split_tokens(args.out, vq, files, args.size or vq_geometry(vq)[0])
    print(json.dumps(summary))


def cmd_train_lm(args: argparse.Namespace) -> None:
    from arrag.training.lm import LMTrainConfig, train_lm

    config = LMTrainConfig(hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
                           intermediate_size=args.intermediate_size, steps=args.steps, batch_size=args.batch_size,
                           lr=args.lr, caption_dropout=args.caption_dropout, precision=args.precision, seed=args.seed)
    metrics = train_lm(args.images, args.vq, args.out, args.checkpoint, config, args.tokens)
    print(f"final loss {metrics['final_loss_last50']:.3f} after {metrics['steps']} steps "
          f"({metrics['train_seconds']:.0f} s, {metrics['trainable_parameters']} trainable parameters)")


def cmd_train_showo(args: argparse.Namespace) -> None:
    from arrag.training.showo import ShowoTrainConfig, train_shapes_showo

    config = ShowoTrainConfig(hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
                              intermediate_size=args.intermediate_size, steps=args.steps, batch_size=args.batch_size,
                              lr=args.lr, caption_dropout=args.caption_dropout, precision=args.precision,
                              seed=args.seed)
    metrics = train_shapes_showo(args.vq, args.images, args.out, config, args.checkpoint, heldout_dir=args.heldout,
                                 sample_guidance=args.guidance_scale, sample_steps=args.maskgit_steps,
                                 tokens_file=args.tokens)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict | list)}))


def cmd_train_clip(args: argparse.Namespace) -> None:
    from arrag.training.clip import ClipTrainConfig, train_clip

    config = ClipTrainConfig(image_size=args.image_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             precision=args.precision, seed=args.seed)
    metrics = train_clip(args.images, args.out, args.checkpoint, config, heldout_dir=args.heldout)
    crops = metrics.get("zero_shot", {}).get("crops", {})
    print(f"zero-shot on held-out crops: colour {crops.get('color', float('nan')):.3f}, shape "
          f"{crops.get('shape', float('nan')):.3f} after {metrics['steps']} steps ({metrics['train_seconds']:.0f} s)")


def _add_train_vq(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="split folder to train on (images/*.png)")
    parser.add_argument("--heldout", type=Path, help="split folder for the reconstruction PSNR")
    parser.add_argument("--out", required=True, type=Path, help="model folder to write (save_pretrained)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="resumable checkpoint file (kept on failure)")
    parser.add_argument("--image-size", type=int, default=config_default("shapes.image_size"),
                        help="image side; the token grid is a 1/8 of it")
    _config_options(parser, "shapes_models.vq", {"codebook-size": int, "steps": int, "batch-size": int, "lr": float})
    parser.add_argument("--seed", type=int, default=config_default("seed"))
    precision_option(parser)
    parser.add_argument("--object-weight", type=float, default=config_default("shapes_models.vq.object_weight"),
                        help="reconstruction loss weight 1 + this on object pixels (the split's masks; 0: unweighted)")
    parser.add_argument("--min-heldout-psnr", type=float, default=config_default("shapes_models.vq.min_heldout_psnr"),
                        help="fail (exit 2) when the held-out PSNR in dB is below this, with --heldout (0: no floor)")
    parser.add_argument("--min-detector-recall", type=float,
                        default=config_default("shapes_models.vq.min_detector_recall"),
                        help="fail (exit 2) when the Shapes detector's recall on held-out reconstructions is lower")
    parser.add_argument("--min-color-accuracy", type=float,
                        default=config_default("shapes_models.vq.min_color_accuracy"),
                        help="fail (exit 2) when its colour accuracy on held-out reconstructions is below this")


def _add_vq_reconstruct(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vq", required=True, type=Path, help="trained VQ folder")
    parser.add_argument("--split", required=True, type=Path, help="split folder (images + annotations.jsonl)")
    parser.add_argument("--out", required=True, type=Path, help="folder for <id>.png reconstructions")
    parser.add_argument("--limit", type=int, help="first N images only")


def _add_tokenize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="split folder (images + annotations.jsonl)")
    parser.add_argument("--vq", required=True, help="JanusVQVAE, Janus backbone or MAGVIT-v2: hub id or folder")
    parser.add_argument("--revision", default="", help="pinned hub revision (empty: none)")
    parser.add_argument("--size", type=int, help="side the images are squared to (default: the VQ's image size)")
    device_option(parser)
    parser.add_argument("--out", required=True, type=Path, help=".npz file to write")


def _language_model_options(parser: argparse.ArgumentParser, key: str) -> None:
    """Options of a Shapes-world backbone trained over the Shapes VQ; defaults from config key `key`."""
    parser.add_argument("--images", required=True, type=Path, help="train split folder (images + annotations)")
    tokens_option(parser)
    parser.add_argument("--vq", required=True, type=Path, help="trained Shapes VQ folder")
    parser.add_argument("--out", required=True, type=Path, help="backbone folder to write (save_pretrained)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="resumable checkpoint file (kept on failure)")
    _config_options(parser, key, {"hidden-size": int, "num-layers": int, "num-heads": int, "intermediate-size": int,
                                  "steps": int, "batch-size": int, "lr": float, "caption-dropout": float})
    parser.add_argument("--seed", type=int, default=config_default("seed"))
    precision_option(parser)


def _add_train_lm(parser: argparse.ArgumentParser) -> None:
    _language_model_options(parser, "shapes_models.lm")


def _add_train_showo(parser: argparse.ArgumentParser) -> None:
    _language_model_options(parser, "showo.train")
    parser.add_argument("--heldout", type=Path, help="held-out split: masked-token cross-entropy, sample captions")
    parser.add_argument("--guidance-scale", type=float, default=config_default("showo.sampling.guidance_scale"),
                        help="sample grid: Show-o guidance")
    parser.add_argument("--maskgit-steps", type=int, default=config_default("showo.sampling.steps"),
                        help="sample grid: decoding steps")


def _add_train_clip(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="split folder to train on (images, masks, captions)")
    parser.add_argument("--heldout", type=Path, help="split folder for the zero-shot colour / shape accuracies")
    parser.add_argument("--out", required=True, type=Path, help="model folder to write (open_clip checkpoint)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="resumable checkpoint file (kept on failure)")
    parser.add_argument("--image-size", type=int, default=config_default("shapes.image_size"))
    _config_options(parser, "shapes_models.clip", {"steps": int, "batch-size": int, "lr": float})
    parser.add_argument("--seed", type=int, default=config_default("seed"))
    precision_option(parser)



COMMANDS = {
    "train-vq": (cmd_train_vq, "train the Shapes VQ tokenizer (a tiny JanusVQVAE)", _add_train_vq),
    "vq-reconstruct": (cmd_vq_reconstruct, "decode(encode(x)) of a split's images, for evaluator checks",
                       _add_vq_reconstruct),
    "tokenize": (cmd_tokenize, "VQ tokens of a split's images, once for every job that trains on them", _add_tokenize),
    "train-lm": (cmd_train_lm, "train the Shapes Janus language model over the Shapes VQ", _add_train_lm),
    "train-showo": (cmd_train_showo, "train the Shapes-world masked-decoding (Show-o) backbone", _add_train_showo),
    "train-clip": (cmd_train_clip, "train the Shapes CLIP (a small open_clip model)", _add_train_clip),
}
