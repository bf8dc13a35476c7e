"""`arrag generate`: one shard of a benchmark with one method (vanilla, RA-CM3, DAiD, FAiD; Janus-Pro or Show-o), or
the shards' records gathered into one."""

from __future__ import annotations

import argparse
from pathlib import Path

from arrag.cli.options import config_default, device_option, precision_option, resolve_device, showo_tokenizer_options
from evaluators.io import write_json_atomic


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

    device = resolve_device(args.device)
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

    device = resolve_device(args.device)
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


def _add_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", choices=["geneval", "dpg", "mjhq", "mjhq_ablation"])
    parser.add_argument("--prompts", type=Path, help="GenEval metadata jsonl, DPG prompt folder or MJHQ meta_data.json")
    parser.add_argument("--method", default="vanilla",
                        choices=["vanilla", "racm3", "daid", "faid", "showo", "showo_daid", "showo_faid"],
                        help="showo*: --backbone is a Show-o (hub id, or a train-showo output)")
    parser.add_argument("--variant", default="default", help="ablation cell or 'default' / 'selected'")
    parser.add_argument("--backbone", help="hub id or local folder of the backbone")
    parser.add_argument("--revision", default="", help="pinned hub revision (empty: none)")
    showo_tokenizer_options(parser)
    device_option(parser)
    precision_option(parser)
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=config_default("seed"))
    parser.add_argument("--cfg-weight", type=float, default=config_default("sampling.cfg_weight"))
    parser.add_argument("--guidance-scale", type=float, default=config_default("showo.sampling.guidance_scale"),
                        help="Show-o: (1 + w) cond - w uncond, the official form (the official t2i config: 5)")
    parser.add_argument("--maskgit-steps", type=int, default=config_default("showo.sampling.steps"),
                        help="Show-o: decoding steps (the official t2i config: 50)")
    parser.add_argument("--temperature", type=float, default=config_default("sampling.temperature"))
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most probable tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--micro-batch", type=int, default=config_default("sampling.micro_batch"),
                        help="images decoded together (fixed per run)")
    parser.add_argument("--samples-per-prompt", type=int,
                        default=config_default("benchmarks.geneval.samples_per_prompt"),
                        help="GenEval samples per prompt")
    parser.add_argument("--ablation-subset", type=int, default=config_default("benchmarks.mjhq.ablation_subset"),
                        help="mjhq_ablation: number of prompts")
    parser.add_argument("--images", required=True, type=Path, help="output image folder (shared by the shards)")
    parser.add_argument("--record", required=True, type=Path, help="provenance record (JSON) to write")
    parser.add_argument("--weights", type=Path, nargs="+", help="fine-tuned weights folder (RA-CM3; FAiD: the "
                        "folder of the variant, or with --variant selected the folders of every ablation cell)")
    parser.add_argument("--blend-unconditional", action="store_true",
                        help="FAiD: augment the unconditional CFG branch too (the official code does not)")
    parser.add_argument("--clip-index", type=Path, help="RA-CM3: build-clip-index output")
    parser.add_argument("--index", type=Path, help="DAiD / FAiD: the patch index")
    parser.add_argument("--selection", type=Path, help="DAiD / FAiD: the selected ablation values")
    parser.add_argument("--daid-k", type=int, default=config_default("daid.k"), help="DAiD: retrieved patches per step")
    parser.add_argument("--daid-retrieval", default=config_default("daid.retrieval"),
                        choices=["patches", "distinct_tokens"],
                        help="DAiD: the distinct tokens of the k nearest patches (paper, official code) or the k "
                        "nearest distinct tokens (ours)")
    parser.add_argument("--gather", action="store_true", help="merge the shard records given as arguments")
    parser.add_argument("shard_records", nargs="*", type=Path, help="with --gather: the shard records")



COMMANDS = {
    "generate": (cmd_generate, "generate one shard of a benchmark with one method, or --gather the shards",
                 _add_generate),
}
