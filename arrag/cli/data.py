"""Data subcommands: the Shapes world and its benchmarks; fetching datasets, models and benchmark files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from arrag.cli.options import config_default


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


def cmd_finetune_split(args: argparse.Namespace) -> None:
    from arrag.finetune_data import build_finetune_split

    summary = build_finetune_split(args.sources, args.out, args.image_size)
    print(json.dumps(summary))


def cmd_fetch(args: argparse.Namespace) -> int:
    from arrag import fetch

    try:
        if args.what == "benchmark":
            spec = fetch.RepoSpec.from_config(json.loads(args.spec), args.key)
            manifest = fetch.fetch_benchmark(spec, args.out, args.cache, args.allow_unpinned)
        elif args.what == "backbone":
            manifest = fetch.fetch_backbone(args.repo, args.revision or None, args.out, args.cache,
                                            args.allow_unpinned, args.key, args.include)
        else:
            specs = [fetch.DatasetSpec.from_config(entry, f"{args.key}[{i}]")
                     for i, entry in enumerate(json.loads(args.spec))]
            sources = fetch.fetch_datasets(specs, args.role, args.out, args.cache, args.subsample, args.seed,
                                           args.allow_unpinned)
            print(f"{args.role}: {', '.join(s['name'] for s in sources)} in {args.out}")
            return 0
    except fetch.FetchError as err:
        print(f"fetch failed: {err}", file=sys.stderr)
        return 2
    for name, source in manifest.sources.items():
        print(f"{name}: {len(source['files'])} files of {source['repo']} at {source['revision']} in {args.out}")
    return 0


def shapes_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=config_default("seed"), help="world seed")
    parser.add_argument("--image-size", type=int, default=config_default("shapes.image_size"),
                        help="image side, pixels")
    parser.add_argument("--supersample", type=int, default=config_default("shapes.supersample"),
                        help="anti-aliasing factor")


def _add_shapes_world(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", required=True, choices=["database", "train", "heldout"])
    parser.add_argument("--count", required=True, type=int, help="number of images")
    parser.add_argument("--out", required=True, type=Path, help="split folder to write")
    shapes_options(parser)


def _add_shapes_benchmarks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heldout", required=True, type=Path, help="held-out split folder (MJHQ references)")
    parser.add_argument("--out", required=True, type=Path, help="benchmark folder to write")
    parser.add_argument("--geneval-per-tag", type=int, default=config_default("benchmarks.geneval.per_tag"))
    parser.add_argument("--dpg-prompts", type=int, default=config_default("benchmarks.dpg.count"))
    parser.add_argument("--mjhq-images", type=int, default=config_default("benchmarks.mjhq.count"))
    shapes_options(parser)


def _add_fetch(parser: argparse.ArgumentParser) -> None:
    what = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    benchmark = what.add_parser("benchmark", help="a benchmark's files from GitHub or Hugging Face (pinned)")
    benchmark.add_argument("--spec", required=True, help="JSON of one resources.benchmarks entry")
    backbone = what.add_parser("backbone", help="a Hugging Face model snapshot (pinned)")
    backbone.add_argument("--repo", required=True, help="hub id, e.g. deepseek-community/Janus-Pro-1B")
    backbone.add_argument("--revision", default="", help="pinned commit (empty: not pinned)")
    backbone.add_argument("--include", nargs="+", help="only the files matching these globs (default: all)")
    datasets = what.add_parser("datasets", help="the image datasets of the patch database or of fine-tuning")
    datasets.add_argument("--spec", required=True, help="JSON list of resources.datasets entries")
    datasets.add_argument("--role", required=True, choices=["database", "finetune"])
    datasets.add_argument("--subsample", type=float, default=config_default("resources.subsample"),
                          help="fraction of files and images")
    datasets.add_argument("--seed", type=int, default=config_default("seed"), help="seed of the file subsample")
    for sub in (benchmark, backbone, datasets):
        sub.add_argument("--out", required=True, type=Path, help="destination folder")
        sub.add_argument("--cache", type=Path, default=Path(config_default("resources.cache")),
                         help="download cache, kept across runs")
        sub.add_argument("--key", default="resources", help="config key of the spec, named in errors")
        sub.add_argument("--allow-unpinned", action="store_true", help="download a null revision at the current "
                         "commit (recorded in the manifest) instead of failing")
    backbone.set_defaults(key="backbone")  # after --key's own default, which it replaces



def _add_finetune_split(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sources", required=True, type=Path,
                        help="fetched fine-tuning datasets (a folder with sources.json: arrag fetch datasets)")
    parser.add_argument("--out", required=True, type=Path, help="split folder to write (images/, annotations.jsonl)")
    parser.add_argument("--image-size", required=True, type=int, help="side of the square images (the backbone's)")


COMMANDS = {
    "shapes-world": (cmd_shapes_world, "render one split of the Shapes world", _add_shapes_world),
    "shapes-benchmarks": (cmd_shapes_benchmarks, "write GenEval / DPG-Bench / MJHQ files of the Shapes world",
                          _add_shapes_benchmarks),
    "fetch": (cmd_fetch, "download pinned datasets, models and benchmark files into resources/", _add_fetch),
    "finetune-split": (cmd_finetune_split, "the paper-scale fine-tuning split (image-caption pairs) from the fetched "
                       "fine-tuning datasets", _add_finetune_split),
}
