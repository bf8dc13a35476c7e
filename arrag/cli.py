"""The `arrag` command line: one subcommand per workflow step; the Snakemake rules are thin calls of these.

A subcommand whose capability has not landed yet is listed with its help text and exits with
"not implemented yet: <capability>" (status 3) without writing any output.
"""

from __future__ import annotations

import argparse
import json
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

    vq = load_vq(args.vq, args.revision or None, image_size=args.size).to(_device(args.device))
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


def cmd_build_clip_index(args: argparse.Namespace) -> None:
    from arrag.clip import ClipSpec, build_clip_index, load_clip_encoder

    spec = ClipSpec(args.model or None, args.pretrained or None,
                    str(args.model_config) if args.model_config else None)
    meta = build_clip_index(args.images, args.out, load_clip_encoder(spec, _device(args.device)), args.batch_size,
                            args.num_workers)
    print(f"{meta['n']} images, {meta['dim']}-d {meta['clip']['model']} embeddings in {args.out}")


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

    return init_distributed(_device(name))


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
                                    _device(args.device), args.revision or None, tokens_file=args.tokens)
    print(json.dumps(summary))


def cmd_finetune_faid(args: argparse.Namespace) -> None:
    from arrag.faid.augment import FAiDSettings
    from arrag.faid.train import finetune_faid

    settings = FAiDSettings(hops=args.hops, m=args.num_blenders, k=args.k, init=args.init)
    metrics = finetune_faid(args.backbone, args.images, args.retrievals, args.out, args.checkpoint, settings,
                            _finetune_config(args), args.caption_dropout, _finetune_device(args.device),
                            args.revision or None)
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


def _device(name: str) -> str:
    import torch

    return name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_generate(args: argparse.Namespace) -> int:
    if args.gather:
        from arrag.records import gather_records

        record = gather_records(args.shard_records, args.record, args.images)
        print(f"{record['images']} images, {record['generation_seconds']:.1f} s of generation")
        return 0
    if args.method.startswith("showo"):
        return _generate_showo(args)
    from arrag.generate import generate_shard
    from arrag.models.janus import SamplingConfig, load_backbone
    from arrag.precision import DTYPES, resolve_precision

    device = _device(args.device)
    dtype = DTYPES[resolve_precision(args.precision, device)]
    backbone = load_backbone(args.backbone, revision=args.revision or None, dtype=dtype, device=device)
    sampling = SamplingConfig(cfg_weight=args.cfg_weight, temperature=args.temperature, top_k=args.top_k or None,
                              top_p=args.top_p if args.top_p < 1 else None)
    method_inputs, method_settings = None, None
    if args.method == "racm3":
        from arrag.racm3 import load_racm3

        if not (args.weights and len(args.weights) == 1 and args.clip_index):
            raise SystemExit("--method racm3 needs --weights (one finetune-racm3 output) and --clip-index")
        retriever, method_settings = load_racm3(backbone, args.weights[0], args.clip_index, device)

        def method_inputs(prompts: list[str]) -> dict:
            return {"prefix_image_tokens": retriever(prompts)}
    if args.method == "daid":
        from arrag.daid import DAiDHook, DAiDSettings, load_index_for, parse_variant

        if not args.index:
            raise SystemExit("--method daid needs --index (the patch index)")
        values = parse_variant(args.variant, args.selection)
        settings = DAiDSettings(k=args.daid_k, tau=float(values["tau"]), lam=float(values["lam"]),
                                retrieval=args.daid_retrieval)
        overlap = device.startswith("cuda")  # see DAiDHook: overlapping pays only when the forward runs on a GPU
        index = load_index_for(backbone.vq, args.index)
        hook = DAiDHook(index, settings, overlap=overlap)
        method_settings = {"k": settings.k, "tau": settings.tau, "lam": settings.lam, "retrieval": settings.retrieval,
                           "index": str(args.index), "nprobe": index.nprobe, "overlap": overlap}

        def method_inputs(prompts: list[str]) -> dict:
            return {"prob_hook": hook}

    if args.method == "faid":
        from arrag.daid import load_index_for
        from arrag.faid.augment import index_retriever
        from arrag.faid.train import load_faid, weights_for

        if not (args.index and args.weights):
            raise SystemExit("--method faid needs --index (the patch index) and --weights (finetune-faid output)")
        weights = weights_for(args.variant, args.weights, args.selection)
        faid, method_settings = load_faid(backbone, weights, blend_unconditional=args.blend_unconditional)
        index = load_index_for(backbone.vq, args.index)
        modules = faid.decode_modules(backbone, index_retriever(index, faid.settings.k))
        method_settings.update(index=str(args.index), nprobe=index.nprobe)

        def method_inputs(prompts: list[str]) -> dict:
            return {"layer_modules": modules, "blend_unconditional": args.blend_unconditional}

    record = generate_shard(backbone, args.benchmark, args.prompts, args.images, args.shard, args.shards, args.seed,
                            sampling, args.micro_batch, args.samples_per_prompt, args.ablation_subset, args.method,
                            args.variant, method_inputs, method_settings, inputs=_generation_inputs(args))
    return _write_generation_record(args, record)


def _generation_inputs(args: argparse.Namespace) -> dict[str, str]:
    """sha256 of the files a generation reads besides the backbone's weights (see `arrag.generate`)."""
    from arrag.generate import inputs_sha256

    paths = {"weights": args.weights, "index": args.index, "clip_index": args.clip_index, "selection": args.selection,
             "tokenizer": args.tokenizer, "text_tokenizer": args.text_tokenizer}
    return inputs_sha256({name: path for name, path in paths.items() if path})


def _write_generation_record(args: argparse.Namespace, record: dict) -> int:
    write_json_atomic(args.record, record)
    print(f"shard {args.shard}/{args.shards}: {record['images_generated']} generated, "
          f"{record['images_skipped']} already there, {record['generation_seconds']:.1f} s")
    return 0


def _generate_showo(args: argparse.Namespace) -> int:
    """`arrag generate` with a Show-o (hub id or folder; its tokenizer from --tokenizer, else the VQ in a Shapes-world
    Show-o's folder): vanilla MaskGIT decoding, DAiD or FAiD on masked decoding (Appendix B.2: retrieval in the final
    half of the steps, O-neighbourhood index)."""
    from arrag.generate import generate_shard, tokens_to_images
    from arrag.models.showo import MaskGitSampling, final_half, generate_tokens, load_showo
    from arrag.precision import DTYPES, resolve_precision
    from arrag.training.showo import load_showo_tokenizer

    device = _device(args.device)
    backbone = load_showo(str(args.backbone), revision=args.revision or None, device=device,
                          dtype=DTYPES[resolve_precision(args.precision, device)],
                          tokenizer_source=args.text_tokenizer or None)
    vq = load_showo_tokenizer(args.backbone, backbone.grid_size, args.tokenizer or None,
                              args.tokenizer_revision or None).to(device)
    sampling = MaskGitSampling(guidance_scale=args.guidance_scale, steps=args.maskgit_steps,
                               temperature=args.temperature)
    extra, method_settings = {}, {}
    if args.method in ("showo_daid", "showo_faid") and not args.index:
        raise SystemExit(f"--method {args.method} needs --index (an O-neighbourhood patch index)")
    if args.method == "showo_daid":
        from arrag.daid import DAiDSettings, load_index_for, parse_variant
        from arrag.masked import MaskedDAiDHook, check_masked_index

        values = parse_variant(args.variant, args.selection)
        settings = DAiDSettings(k=args.daid_k, tau=float(values["tau"]), lam=float(values["lam"]),
                                retrieval=args.daid_retrieval)
        index = load_index_for(vq, args.index)
        check_masked_index(index, backbone.grid_size, backbone.config.codebook_size)
        extra = {"prob_hook": MaskedDAiDHook(index, settings), "hook_steps": final_half(sampling.steps)}
        method_settings = {"k": settings.k, "tau": settings.tau, "lam": settings.lam, "retrieval": settings.retrieval,
                           "index": str(args.index), "nprobe": index.nprobe, "steps": list(final_half(sampling.steps))}
    if args.method == "showo_faid":
        from arrag.daid import load_index_for
        from arrag.masked import load_masked_faid, masked_decode_modules

        if not (args.weights and len(args.weights) == 1):
            raise SystemExit("--method showo_faid needs --weights (one finetune-showo-faid output)")
        faid, method_settings = load_masked_faid(backbone, args.weights[0])
        index = load_index_for(vq, args.index)
        extra = {"layer_modules": masked_decode_modules(backbone, faid, index)}
        method_settings.update(index=str(args.index), nprobe=index.nprobe)

    def generate_images(prompts: list[str], seeds: list[int]) -> list:
        return tokens_to_images(vq, generate_tokens(backbone, prompts, seeds, sampling, **extra), backbone.grid_size)

    record = generate_shard(backbone, args.benchmark, args.prompts, args.images, args.shard, args.shards, args.seed,
                            sampling, args.micro_batch, args.samples_per_prompt, args.ablation_subset, args.method,
                            args.variant, method_settings=method_settings, generate_images=generate_images,
                            inputs=_generation_inputs(args))
    return _write_generation_record(args, record)


def cmd_select(args: argparse.Namespace) -> None:
    from arrag.select import parse_cell, write_selection

    pinned = parse_cell("_".join(args.pin)) if args.pin else None
    record = write_selection(args.method, args.fid_records, args.out, pinned)
    how = "pinned by the config" if record["pinned"] else f"lowest FID {record['fid']:.3f}"
    print(f"{args.method}: {record['values']} ({how})")


def cmd_tables(args: argparse.Namespace) -> None:
    from arrag.tables import RunSpec, render_tables

    methods = dict(pair.split("=", 1) for pair in args.method)
    run = RunSpec(args.run_dir, args.scale, methods, (tuple(args.daid_lam), tuple(args.daid_tau)),
                  (tuple(args.faid_hops), tuple(args.faid_m)), args.reported)
    render_tables(run, args.out_dir)
    print(f"tables and figures in {args.out_dir} (index: {args.out_dir / 'README.md'})")


def cmd_fetch(args: argparse.Namespace) -> int:
    import json

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


def _key_spec(args: argparse.Namespace):
    from arrag.patchdb.neighbourhood import KeySpec

    return KeySpec(args.neighbourhood, args.hops, args.key_space, args.edge_policy)


def cmd_exclusion_list(args: argparse.Namespace) -> None:
    from arrag.patchdb.sources import write_exclusions

    exclusions = write_exclusions(args.out, args.folders)
    print(f"{len(exclusions.ids)} ids and {len(exclusions.sha256)} image hashes excluded from the patch database")


def cmd_encode_patches(args: argparse.Namespace) -> None:
    from arrag.patchdb.encode import encode_shard, load_vq
    from arrag.patchdb.sources import Exclusions, read_sources

    vq = load_vq(args.vq, revision=args.revision or None, image_size=args.image_size).to(_device(args.device))
    meta = encode_shard(vq, read_sources(args.images), args.shard, args.shards, _key_spec(args),
                        Exclusions.read(args.exclusions), args.out, args.batch_size)
    for count in meta["sources"]:
        print(json.dumps(count))


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
    images = [data for source in read_sources(args.images) for _, data in source.read()][:args.limit or None]
    tokens, _ = encode_images(vq, images, desc="encode held-out images")
    rows = retrieval_accuracy(index, torch.from_numpy(tokens.astype("int64")), k=args.k, seed=args.seed)
    write_retrieval_accuracy(rows, args.csv, args.png, title=f"{len(images)} held-out images, "
                             f"{index.kind} index of {index.ntotal} patches")
    for row in rows:
        print(json.dumps(row))


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
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    _precision_option(parser)
    parser.add_argument("--object-weight", type=float, default=9.0,
                        help="reconstruction loss weight 1 + this on object pixels (the split's masks; 0: unweighted)")
    parser.add_argument("--min-heldout-psnr", type=float, default=0.0,
                        help="fail (exit 2) when the held-out PSNR in dB is below this, with --heldout (0: no floor)")
    parser.add_argument("--min-detector-recall", type=float, default=0.0,
                        help="fail (exit 2) when the Shapes detector's recall on held-out reconstructions is lower")
    parser.add_argument("--min-color-accuracy", type=float, default=0.0,
                        help="fail (exit 2) when its colour accuracy on held-out reconstructions is below this")


def _add_vq_reconstruct(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vq", required=True, type=Path, help="trained VQ folder")
    parser.add_argument("--split", required=True, type=Path, help="split folder (images + annotations.jsonl)")
    parser.add_argument("--out", required=True, type=Path, help="folder for <id>.png reconstructions")
    parser.add_argument("--limit", type=int, help="first N images only")


def _precision_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="compute precision; auto: bf16 only where the device has native bf16 (arrag.precision)")


def _tokens_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=Path, help="VQ tokens of the images (`arrag tokenize`; default: encode here)")


def _add_tokenize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="split folder (images + annotations.jsonl)")
    parser.add_argument("--vq", required=True, help="JanusVQVAE, Janus backbone or MAGVIT-v2: hub id or folder")
    parser.add_argument("--revision", default="", help="pinned hub revision (empty: none)")
    parser.add_argument("--size", type=int, help="side the images are squared to (default: the VQ's image size)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", required=True, type=Path, help=".npz file to write")


def _add_train_lm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="train split folder (images + annotations)")
    _tokens_option(parser)
    parser.add_argument("--vq", required=True, type=Path, help="trained Shapes VQ folder")
    parser.add_argument("--out", required=True, type=Path, help="backbone folder to write (save_pretrained)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="resumable checkpoint file (kept on failure)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    _precision_option(parser)


def _add_train_showo(parser: argparse.ArgumentParser) -> None:
    _add_train_lm(parser)
    parser.set_defaults(steps=500)
    parser.add_argument("--heldout", type=Path, help="held-out split: masked-token cross-entropy, sample captions")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="sample grid: Show-o guidance")
    parser.add_argument("--maskgit-steps", type=int, default=12, help="sample grid: decoding steps")


def _add_train_clip(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="split folder to train on (images, masks, captions)")
    parser.add_argument("--heldout", type=Path, help="split folder for the zero-shot colour / shape accuracies")
    parser.add_argument("--out", required=True, type=Path, help="model folder to write (open_clip checkpoint)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="resumable checkpoint file (kept on failure)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    _precision_option(parser)


def _add_build_clip_index(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="database images (a split folder or image tree)")
    parser.add_argument("--model", default="", help="open_clip architecture (empty: the --model-config file stem)")
    parser.add_argument("--pretrained", default="", help="open_clip pretrained tag or checkpoint file")
    parser.add_argument("--model-config", type=Path, help="open_clip config JSON of a custom architecture")
    parser.add_argument("--out", required=True, type=Path, help="index folder to write")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="image decoding workers")


def _finetune_options(parser: argparse.ArgumentParser) -> None:
    """Options of the shared fine-tuning loop (`arrag.training.finetune.FinetuneConfig`; paper defaults)."""
    parser.add_argument("--backbone", required=True, help="hub id or local folder of the backbone")
    parser.add_argument("--revision", default="", help="pinned hub revision (empty: none)")
    parser.add_argument("--images", required=True, type=Path, help="fine-tuning split (images + annotations.jsonl)")
    _tokens_option(parser)
    parser.add_argument("--out", required=True, type=Path, help="weights folder to write")
    parser.add_argument("--checkpoint", required=True, type=Path, help="resumable checkpoint folder")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--lora-rank", type=int, default=128, help="0: no LoRA")
    parser.add_argument("--lora-alpha", type=int, default=256)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--freeze-generation-head", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    _precision_option(parser)


def _add_finetune_racm3(parser: argparse.ArgumentParser) -> None:
    _finetune_options(parser)
    parser.add_argument("--clip-index", required=True, type=Path, help="build-clip-index output")
    parser.add_argument("--top-n", type=int, default=1, help="retrieved images per prompt")


def _add_precompute_retrievals(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, type=Path, help="the patch index")
    parser.add_argument("--backbone", required=True, help="hub id or local folder of the backbone (its VQ)")
    parser.add_argument("--revision", default="", help="pinned hub revision (empty: none)")
    parser.add_argument("--images", required=True, type=Path, help="fine-tuning split (images + annotations.jsonl)")
    _tokens_option(parser)
    parser.add_argument("--k", type=int, default=10, help="retrieved patches per position (paper: 10)")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", required=True, type=Path, help=".npz file to write")


def _add_finetune_faid(parser: argparse.ArgumentParser) -> None:
    _finetune_options(parser)
    parser.add_argument("--hops", required=True, help="blender hop levels, e.g. 1, 2 or 12")
    parser.add_argument("--num-blenders", required=True, type=int, help="number of blender modules m")
    parser.add_argument("--k", type=int, default=10, help="retrieved patches per position")
    parser.add_argument("--init", default="zero", choices=["zero", "official"],
                        help="blender initialisation: zero output convolutions (default) or the official Kaiming")
    parser.add_argument("retrievals", nargs="+", type=Path, help="precompute-retrievals shard files")


def _showo_tokenizer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", default="", help="Show-o's image tokenizer: MAGVIT-v2 hub id or folder "
                        "(showlab/magvitv2); empty: the VQ inside a Shapes-world Show-o's folder")
    parser.add_argument("--tokenizer-revision", default="", help="pinned hub revision of --tokenizer (empty: none)")
    parser.add_argument("--text-tokenizer", default="", help="Show-o's text tokenizer, folder or hub id (empty: the "
                        "backbone folder's, else its config's llm_model_path, microsoft/phi-1_5)")


def _add_finetune_showo_faid(parser: argparse.ArgumentParser) -> None:
    _finetune_options(parser)
    _showo_tokenizer_options(parser)
    parser.add_argument("--index", required=True, type=Path, help="O-neighbourhood patch index (build-index)")
    parser.add_argument("--hops", required=True, help="blender hop levels, e.g. 1, 2 or 12")
    parser.add_argument("--num-blenders", required=True, type=int, help="number of blender modules m")
    parser.add_argument("--k", type=int, default=10, help="retrieved patches per masked position")
    parser.add_argument("--init", default="zero", choices=["zero", "official"])
    parser.add_argument("--max-images", type=int, default=0, help="fine-tune on the first N images (0: all)")
    parser.add_argument("--noise-draws", type=int, default=1,
                        help="noised states (time steps) per image, each a training row with its own retrievals")


def _add_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", choices=["geneval", "dpg", "mjhq", "mjhq_ablation"])
    parser.add_argument("--prompts", type=Path, help="GenEval metadata jsonl, DPG prompt folder or MJHQ meta_data.json")
    parser.add_argument("--method", default="vanilla",
                        choices=["vanilla", "racm3", "daid", "faid", "showo", "showo_daid", "showo_faid"],
                        help="showo*: --backbone is a Show-o (hub id, or a train-showo output)")
    parser.add_argument("--variant", default="default", help="ablation cell or 'default' / 'selected'")
    parser.add_argument("--backbone", help="hub id or local folder of the backbone")
    parser.add_argument("--revision", default="", help="pinned hub revision (empty: none)")
    _showo_tokenizer_options(parser)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    _precision_option(parser)
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg-weight", type=float, default=5.0)
    parser.add_argument("--guidance-scale", type=float, default=5.0,
                        help="Show-o: (1 + w) cond - w uncond, the official form (official t2i default 5)")
    parser.add_argument("--maskgit-steps", type=int, default=50, help="Show-o: decoding steps (official default 50)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most probable tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--micro-batch", type=int, default=16, help="images decoded together (fixed per run)")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="GenEval samples per prompt")
    parser.add_argument("--ablation-subset", type=int, default=0, help="mjhq_ablation: number of prompts")
    parser.add_argument("--images", required=True, type=Path, help="output image folder (shared by the shards)")
    parser.add_argument("--record", required=True, type=Path, help="provenance record (JSON) to write")
    parser.add_argument("--weights", type=Path, nargs="+", help="fine-tuned weights folder (RA-CM3; FAiD: the "
                        "folder of the variant, or with --variant selected the folders of every ablation cell)")
    parser.add_argument("--blend-unconditional", action="store_true",
                        help="FAiD: augment the unconditional CFG branch too (the official code does not)")
    parser.add_argument("--clip-index", type=Path, help="RA-CM3: build-clip-index output")
    parser.add_argument("--index", type=Path, help="DAiD / FAiD: the patch index")
    parser.add_argument("--selection", type=Path, help="DAiD / FAiD: the selected ablation values")
    parser.add_argument("--daid-k", type=int, default=2048, help="DAiD: retrieved patches per step")
    parser.add_argument("--daid-retrieval", default="patches", choices=["patches", "distinct_tokens"],
                        help="DAiD: the distinct tokens of the k nearest patches (paper, official code) or the k "
                        "nearest distinct tokens (ours)")
    parser.add_argument("--gather", action="store_true", help="merge the shard records given as arguments")
    parser.add_argument("shard_records", nargs="*", type=Path, help="with --gather: the shard records")


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
    datasets.add_argument("--subsample", type=float, default=1.0, help="fraction of files and images (default 1)")
    datasets.add_argument("--seed", type=int, default=0, help="seed of the file subsample")
    for sub in (benchmark, backbone, datasets):
        sub.add_argument("--out", required=True, type=Path, help="destination folder")
        sub.add_argument("--cache", type=Path, default=Path("resources/.cache"),
                         help="download cache, kept across runs (default resources/.cache)")
        sub.add_argument("--key", default="resources", help="config key of the spec, named in errors")
        sub.add_argument("--allow-unpinned", action="store_true", help="download a null revision at the current "
                         "commit (recorded in the manifest) instead of failing")
    backbone.set_defaults(key="backbone")  # after --key's own default, which it replaces


def _add_tables(parser: argparse.ArgumentParser) -> None:
    from arrag.tables import REPORTED_DIR

    parser.add_argument("--run-dir", required=True, type=Path, help="run folder (results/<run_name>)")
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for the tables, figures and README.md")
    parser.add_argument("--scale", required=True, choices=["shapes", "paper"])
    parser.add_argument("--method", action="append", default=[], metavar="METHOD=VARIANT",
                        help="a method of the run and the variant of its main-table records (repeat)")
    parser.add_argument("--daid-lam", nargs="*", default=[], help="DAiD ablation grid: lambda values")
    parser.add_argument("--daid-tau", nargs="*", default=[], help="DAiD ablation grid: tau values")
    parser.add_argument("--faid-hops", nargs="*", default=[], help="FAiD ablation grid: hop levels")
    parser.add_argument("--faid-m", nargs="*", default=[], help="FAiD ablation grid: numbers of blenders")
    parser.add_argument("--reported", type=Path, default=REPORTED_DIR, help="the paper's numbers (CSV folder)")


def _add_key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--neighbourhood", default="L", choices=["L", "O"], help="L: causal; O: all around")
    parser.add_argument("--hops", default="1", help="key hop levels, e.g. 1 or 12 (default 1)")
    parser.add_argument("--key-space", default="codebook", choices=["codebook", "latent"])
    parser.add_argument("--edge-policy", default="zero", choices=["zero", "skip"],
                        help="zero: missing neighbours are zero vectors (paper); skip: no key at the edges (official)")


def _add_exclusion_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="exclusion list (JSON: ids and sha256) to write")
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
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", required=True, type=Path, help="shard file (.npz) to write")
    _add_key_options(parser)


def _add_train_index(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--type", default="tokens", choices=["flat", "ivfpq", "tokens"])
    parser.add_argument("--nlist", type=int, default=0, help="inverted lists (0: ivfpq 4 sqrt(P), tokens sqrt(P))")
    parser.add_argument("--pq-m", type=int, default=8, help="ivfpq OPQ / PQ sub-quantisers (official: 8)")
    parser.add_argument("--pq-bits", type=int, default=8, help="ivfpq bits per sub-quantiser code (official: 8)")
    parser.add_argument("--nprobe", type=int, default=0, help="lists visited per query (ours; 0: ivfpq 32, the value "
                        "the official retriever passes, tokens 8)")
    parser.add_argument("--official-nprobe", action="store_true", help="probe 1 list, as the official runs did (their "
                        "nprobe, set on the OPQ wrapper, never reached the IVF); overrides --nprobe")
    parser.add_argument("--train-size", type=int, default=0, help="training keys (0: ivfpq 100 x nlist, tokens 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--neighbourhood", choices=["L", "O"],
                        help="codebook-space keys of this neighbourhood, made from the shards' tokens (default: the "
                        "shards' own keys); with --hops and --edge-policy")
    parser.add_argument("--hops", default="1", help="with --neighbourhood: key hop levels (default 1)")
    parser.add_argument("--edge-policy", default="zero", choices=["zero", "skip"], help="with --neighbourhood")
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
    parser.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    parser.add_argument("--k", type=int, default=10, help="retrieved tokens per position")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-token baseline")
    parser.add_argument("--csv", required=True, type=Path)
    parser.add_argument("--png", required=True, type=Path)


def _add_select(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=["daid", "faid"])
    parser.add_argument("--out", required=True, type=Path, help="selection record (JSON) to write")
    parser.add_argument("--pin", action="append", default=[],
                        help="a value pinned by the config instead of selected, e.g. --pin lam0.3 --pin tau1.0")
    parser.add_argument("fid_records", nargs="*", type=Path, help="metrics/mjhq_ablation/<method>/<cell>/fid.json")


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
    "fetch": (cmd_fetch, "download pinned datasets, models and benchmark files into resources/",
              "data acquisition (Paper-scale issue)", _add_fetch),
    "train-vq": (cmd_train_vq, "train the Shapes VQ tokenizer (a tiny JanusVQVAE)",
                 "Shapes VQ training (Backbones issue)", _add_train_vq),
    "vq-reconstruct": (cmd_vq_reconstruct, "decode(encode(x)) of a split's images, for evaluator checks",
                       "VQ reconstructions (Backbones issue)", _add_vq_reconstruct),
    "tokenize": (cmd_tokenize, "VQ tokens of a split's images, once for every job that trains on them",
                 "split tokens (Backbones issue)", _add_tokenize),
    "train-lm": (cmd_train_lm, "train the Shapes Janus language model over the Shapes VQ",
                 "Shapes backbone training (Backbones issue)", _add_train_lm),
    "train-clip": (cmd_train_clip, "train the Shapes CLIP (a small open_clip model)", "Shapes CLIP (RA-CM3 issue)",
                   _add_train_clip),
    "exclusion-list": (cmd_exclusion_list, "ids and image hashes kept out of the patch database (leakage)",
                       "patch database (Patch database issue)", _add_exclusion_list),
    "encode-patches": (cmd_encode_patches, "encode one shard of database images into patch keys and values",
                       "patch database (Patch database issue)", _add_encode_patches),
    "train-index": (cmd_train_index, "train the patch index (flat, ivfpq or tokens) on all shards",
                    "FAISS index (Patch database issue)", _add_train_index),
    "build-index": (cmd_build_index, "train, fill and merge an index in one job (small databases)",
                    "FAISS index (Patch database issue)", _add_train_index),
    "add-shard": (cmd_add_shard, "add one shard of patches to the trained index", "FAISS index (Patch database issue)",
                  _add_add_shard),
    "merge-index": (cmd_merge_index, "merge the per-shard indexes", "FAISS index (Patch database issue)",
                    _add_merge_index),
    "retrieval-analysis": (cmd_retrieval_analysis, "Figure 6: distance of the k-th retrieved token to the ground truth",
                           "retrieval analysis (Patch database issue)", _add_retrieval_analysis),
    "build-clip-index": (cmd_build_clip_index, "image-level CLIP index for RA-CM3", "RA-CM3 retrieval (RA-CM3 issue)",
                         _add_build_clip_index),
    "precompute-retrievals": (cmd_precompute_retrievals, "top-k retrievals for every position of the fine-tuning "
                              "images", "FAiD training data (FAiD issue)", _add_precompute_retrievals),
    "finetune-faid": (cmd_finetune_faid, "fine-tune FAiD blenders (and LoRA)", "FAiD fine-tuning (FAiD issue)",
                      _add_finetune_faid),
    "train-showo": (cmd_train_showo, "train the Shapes-world masked-decoding (Show-o) backbone",
                    "Show-o backbone (Show-o issue)", _add_train_showo),
    "finetune-showo-faid": (cmd_finetune_showo_faid, "fine-tune FAiD blenders on a Show-o backbone (masked decoding)",
                            "FAiD on Show-o (Show-o issue)", _add_finetune_showo_faid),
    "finetune-racm3": (cmd_finetune_racm3, "fine-tune the backbone with prepended retrieved images",
                       "RA-CM3 fine-tuning (RA-CM3 issue)", _add_finetune_racm3),
    "generate": (cmd_generate, "generate one shard of a benchmark with one method, or --gather the shards",
                 "generation (Backbones issue)", _add_generate),
    "select": (cmd_select, "pick ablation values with the lowest FID (or the pinned ones)",
               "hyperparameter selection (DAiD issue)", _add_select),
    "tables": (cmd_tables, "render Tables 1-4 and Figure 7 from result records", "tables (Paper-scale issue)",
               _add_tables),
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
