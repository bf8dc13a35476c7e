"""Patch-database subcommands: exclusions, patch encoding, the patch index (train, add, merge), the retrieval
analysis of Figure 6, and RA-CM3's image-level CLIP index."""

from __future__ import annotations

import argparse
import json
from itertools import islice
from pathlib import Path

from arrag.cli.options import config_default, device_option, resolve_device


def cmd_exclusion_list(args: argparse.Namespace) -> None:
    from arrag.patchdb.sources import write_exclusions

    exclusions = write_exclusions(args.out, args.folders)
    print(f"{len(exclusions.keys)} (source, id) keys and {len(exclusions.sha256)} image hashes excluded from the "
          "patch database")


def cmd_encode_patches(args: argparse.Namespace) -> None:
    from arrag.patchdb.encode import encode_shard, load_vq
    from arrag.patchdb.sources import Exclusions, read_sources

    vq = load_vq(args.vq, revision=args.revision or None, image_size=args.image_size).to(resolve_device(args.device))
    meta = encode_shard(vq, read_sources(args.images), args.shard, args.shards, _key_spec(args),
                        Exclusions.read(args.exclusions), args.out, args.batch_size)
    for count in meta["sources"]:
        print(json.dumps(count))


def _key_spec(args: argparse.Namespace):
    from arrag.patchdb.neighbourhood import KeySpec

    return KeySpec(args.neighbourhood, args.hops, args.key_space, args.edge_policy)


def _index_params(args: argparse.Namespace):
    """(IndexParams, key redefinition or None) of the train-index / build-index options."""
    from arrag.patchdb.build import IndexParams
    from arrag.patchdb.neighbourhood import KeySpec

    params = IndexParams(kind=args.type, nlist=args.nlist, pq_m=args.pq_m, pq_bits=args.pq_bits, nprobe=args.nprobe,
                         train_size=args.train_size, seed=args.seed, official_nprobe=args.official_nprobe)
    spec = KeySpec(args.neighbourhood, args.hops, "codebook", args.edge_policy) if args.neighbourhood else None
    return params, spec


def cmd_train_index(args: argparse.Namespace) -> None:
    from arrag.patchdb.build import train_index

    layout = train_index(args.shards, args.out, *_index_params(args))
    print(f"{args.type} index for {layout['patches']} patches of {layout['images']} images in "
          f"{len(layout['shards'])} shards")


def cmd_build_index(args: argparse.Namespace) -> None:
    from arrag.patchdb.build import build_index

    print(json.dumps(build_index(args.shards, args.out, *_index_params(args)).to_dict()))


def cmd_add_shard(args: argparse.Namespace) -> None:
    from arrag.patchdb.build import add_shard

    print(f"{add_shard(args.trained, args.shard, args.out)} patches added")


def cmd_merge_index(args: argparse.Namespace) -> None:
    from arrag.patchdb.build import merge_index

    fingerprint = merge_index(args.added, args.shards, args.out, ondisk=args.ondisk)
    print(json.dumps(fingerprint.to_dict()))


def cmd_retrieval_analysis(args: argparse.Namespace) -> None:
    import torch

    from arrag.models.vq import codebook_vectors
    from arrag.patchdb.analysis import retrieval_accuracy, write_retrieval_accuracy
    from arrag.patchdb.encode import encode_images, load_vq, vq_geometry
    from arrag.patchdb.fingerprint import Fingerprint, read_metadata
    from arrag.patchdb.index import PatchIndex, metadata_path
    from arrag.patchdb.sources import read_sources

    vq = load_vq(args.vq, revision=args.revision or None)
    stored, _ = read_metadata(metadata_path(args.index))
    expected = Fingerprint.expected(codebook_vectors(vq, normalized=True), vq_geometry(vq)[1], stored.spec)
    index = PatchIndex.load(args.index, expected=expected)
    stream = (data for source in read_sources(args.images) for _, data in source.read())
    images = list(islice(stream, args.limit or None))  # reads no image past the limit
    tokens, _ = encode_images(vq, images, desc="encode held-out images")
    rows = retrieval_accuracy(index, torch.from_numpy(tokens.astype("int64")), k=args.k, seed=args.seed)
    write_retrieval_accuracy(rows, args.csv, args.png, title=f"{len(images)} held-out images, "
                             f"{index.kind} index of {index.ntotal} patches")
    for row in rows:
        print(json.dumps(row))


def cmd_build_clip_index(args: argparse.Namespace) -> None:
    from arrag.clip import ClipSpec, build_clip_index, load_clip_encoder

    spec = ClipSpec(args.model or None, args.pretrained or None,
                    str(args.model_config) if args.model_config else None)
    encoder = load_clip_encoder(spec, resolve_device(args.device))
    meta = build_clip_index(args.images, args.out, encoder, args.batch_size, args.num_workers)
    print(f"{meta['n']} images, {meta['dim']}-d {meta['clip']['model']} embeddings in {args.out}")


def _add_key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--neighbourhood", default=config_default("index.neighbourhood"), choices=["L", "O"],
                        help="L: causal; O: all around")
    parser.add_argument("--hops", default=config_default("index.hops"), help="key hop levels, e.g. 1 or 12")
    parser.add_argument("--key-space", default=config_default("index.key_space"), choices=["codebook", "latent"])
    parser.add_argument("--edge-policy", default=config_default("index.edge_policy"), choices=["zero", "skip"],
                        help="zero: missing neighbours are zero vectors (paper); skip: no key at the edges (official)")


def _add_exclusion_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path,
                        help="exclusion list (JSON: (source, id) keys and sha256) to write")
    parser.add_argument("folders", nargs="+", type=Path, help="image folders to exclude (benchmarks, fine-tuning)")


def _add_encode_patches(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path,
                        help="database folder: a Shapes split or a folder with sources.json (arrag fetch)")
    parser.add_argument("--vq", required=True, help="JanusVQVAE, Janus backbone or MAGVIT-v2 folder / hub id")
    parser.add_argument("--revision", default="", help="pinned hub revision of --vq (empty: none)")
    parser.add_argument("--image-size", type=int, help="MAGVIT-v2: image side it encodes (default 256)")
    parser.add_argument("--shard", required=True, type=int)
    parser.add_argument("--shards", required=True, type=int)
    parser.add_argument("--exclusions", type=Path, help="exclusion list written by `arrag exclusion-list`")
    parser.add_argument("--batch-size", type=int, default=config_default("index.batch_size"))
    device_option(parser)
    parser.add_argument("--out", required=True, type=Path, help="shard file (.npz) to write")
    _add_key_options(parser)


def _add_train_index(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--type", default=config_default("index.type"), choices=["flat", "ivfpq", "tokens"])
    parser.add_argument("--nlist", type=int, default=config_default("index.nlist"),
                        help="inverted lists (0: ivfpq 4 sqrt(P), tokens sqrt(P))")
    parser.add_argument("--pq-m", type=int, default=config_default("index.pq_m"),
                        help="ivfpq OPQ / PQ sub-quantisers (official: 8)")
    parser.add_argument("--pq-bits", type=int, default=8, help="ivfpq bits per sub-quantiser code (official: 8)")
    parser.add_argument("--nprobe", type=int, default=config_default("index.nprobe"), help="lists visited per query "
                        "(ours; 0: ivfpq 32, the value "
                        "the official retriever passes, tokens 8)")
    parser.add_argument("--official-nprobe", action="store_true", help="probe 1 list, as the official runs did (their "
                        "nprobe, set on the OPQ wrapper, never reached the IVF); overrides --nprobe")
    parser.add_argument("--train-size", type=int, default=config_default("index.train_size"),
                        help="training keys (0: ivfpq 100 x nlist, tokens 40)")
    parser.add_argument("--seed", type=int, default=config_default("seed"))
    parser.add_argument("--neighbourhood", choices=["L", "O"],
                        help="codebook-space keys of this neighbourhood, made from the shards' tokens (default: the "
                        "shards' own keys); with --hops and --edge-policy")
    parser.add_argument("--hops", default=config_default("index.hops"), help="with --neighbourhood: key hop levels")
    parser.add_argument("--edge-policy", default=config_default("index.edge_policy"), choices=["zero", "skip"],
                        help="with --neighbourhood")
    parser.add_argument("--out", required=True, type=Path, help="index to write (+ .json; train-index: empty)")
    parser.add_argument("shards", nargs="+", type=Path, help="every shard file of the database")


def _add_add_shard(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trained", required=True, type=Path, help="trained index (train-index)")
    parser.add_argument("--shard", required=True, type=Path, help="shard file (encode-patches)")
    parser.add_argument("--out", required=True, type=Path, help="index of this shard to write (+ .json)")


def _add_merge_index(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--added", required=True, nargs="+", type=Path, help="per-shard indexes (add-shard)")
    parser.add_argument("--shards", required=True, nargs="+", type=Path, help="the shard files (encode-patches)")
    parser.add_argument("--ondisk", action="store_true", help="ivfpq: inverted lists in <out>.ivfdata (merge_ondisk)")
    parser.add_argument("--out", required=True, type=Path, help="index to write (+ .json, .values.npz)")


def _add_retrieval_analysis(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, type=Path, help="merged patch index")
    parser.add_argument("--vq", required=True, help="the index's JanusVQVAE or Janus backbone folder / hub id")
    parser.add_argument("--revision", default="", help="pinned hub revision of --vq (empty: none)")
    parser.add_argument("--images", required=True, type=Path, help="held-out images (split folder or sources.json)")
    parser.add_argument("--limit", type=int, default=config_default("index.analysis_images"),
                        help="at most this many images (0: all)")
    parser.add_argument("--k", type=int, default=config_default("index.analysis_k"),
                        help="retrieved tokens per position")
    parser.add_argument("--seed", type=int, default=config_default("seed"), help="seed of the random-token baseline")
    parser.add_argument("--csv", required=True, type=Path)
    parser.add_argument("--png", required=True, type=Path)


def _add_build_clip_index(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="database images (a split folder or image tree)")
    parser.add_argument("--model", default="", help="open_clip architecture (empty: the --model-config file stem)")
    parser.add_argument("--pretrained", default="", help="open_clip pretrained tag or checkpoint file")
    parser.add_argument("--model-config", type=Path, help="open_clip config JSON of a custom architecture")
    parser.add_argument("--out", required=True, type=Path, help="index folder to write")
    device_option(parser)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="image decoding workers")



COMMANDS = {
    "exclusion-list": (cmd_exclusion_list, "images kept out of the patch database (leakage), by key and hash",
                       _add_exclusion_list),
    "encode-patches": (cmd_encode_patches, "encode one shard of database images into patch keys and values",
                       _add_encode_patches),
    "train-index": (cmd_train_index, "train the patch index (flat, ivfpq or tokens) on all shards", _add_train_index),
    "build-index": (cmd_build_index, "train, fill and merge an index in one job (small databases)", _add_train_index),
    "add-shard": (cmd_add_shard, "add one shard of patches to the trained index", _add_add_shard),
    "merge-index": (cmd_merge_index, "merge the per-shard indexes", _add_merge_index),
    "retrieval-analysis": (cmd_retrieval_analysis, "Figure 6: distance of the k-th retrieved token to the ground truth",
                           _add_retrieval_analysis),
    "build-clip-index": (cmd_build_clip_index, "image-level CLIP index for RA-CM3", _add_build_clip_index),
}
