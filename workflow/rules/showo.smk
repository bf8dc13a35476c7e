# Show-o-style masked decoding (Table 3's Show-o rows, Appendix B.2): an O-neighbourhood index of the backbone's
# tokens, FAiD fine-tuned on Show-o's noising, and generation / metrics through the shared `generate` /
# `image_metric` rules (methods showo, showo_daid, showo_faid; MJHQ-style benchmark only).
# Shapes: a Show-o of the same classes trained over the Shapes VQ; its O index is redefined from the main index's
# shards (same tokens). Paper scale: the hub Show-o with its MAGVIT-v2 tokenizer, whose tokens of the database
# and of the fine-tuning images are encoded here (SHOWO_SHARDS, SHOWO_TOKENS in common.smk).
SHOWO = config["showo"]


if SHAPES:

    rule train_shapes_showo:
        """A Show-o transformer (Phi, omni-attention, MaskGIT) over the Shapes VQ's tokens, with Show-o's masked-token
        objective; its folder holds a copy of the VQ. Its sample grid decodes with the CLI's default settings, not
        `showo.sampling` (a change of the generation settings must not retrain the backbone).
        """
        input:
            images=f"{R}/shapes/train",
            heldout=f"{R}/shapes/heldout",
            vq=f"{R}/models/vq",
            tokens=SPLIT_TOKENS,
        output:
            directory(SHOWO_MODEL),
        log:
            f"{LOGS}/train_shapes_showo.log",
        benchmark:
            f"{LOGS}/train_shapes_showo.benchmark.tsv"
        priority: CHAIN_PRIORITY
        conda:
            MAIN_ENV
        threads: 2
        params:
            code=code_hash("train-showo"),
            precision=config["precision"],
            checkpoint=f"{R}/checkpoints/showo.pt",
            train=finetune_arguments(SHOWO["train"]),
            seed=config["seed"],
        shell:
            "OMP_NUM_THREADS={threads} python -m arrag.cli train-showo --images {input.images:q} --heldout {input.heldout:q}"
            " --vq {input.vq:q} --tokens {input.tokens:q} --out {output:q} --checkpoint {params.checkpoint:q} {params.train:q}"
            " --seed {params.seed} --precision {params.precision} > {log:q} 2>&1"


rule showo_index:
    """The O-neighbourhood index of masked decoding, keys defined (Shapes: redefined) from token shards."""
    input:
        SHOWO_SHARDS,
    output:
        index=SHOWO_INDEX,
        sidecars=SHOWO_INDEX_SIDECARS,
    log:
        f"{LOGS}/showo_index.log",
    benchmark:
        f"{LOGS}/showo_index.benchmark.tsv"
    priority: CHAIN_PRIORITY
    conda:
        MAIN_ENV
    threads: 1
    params:
        code=code_hash("build-index"),
        hops=SHOWO["index"]["hops"],
        edge=SHOWO["index"]["edge_policy"],
        nprobe=config["index"]["nprobe"],
        official_nprobe=(
            "--official-nprobe" if config["index"]["official_nprobe"] else ""
        ),
        seed=config["seed"],
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli build-index --type tokens --neighbourhood O --hops {params.hops}"
        " --edge-policy {params.edge} --nprobe {params.nprobe} {params.official_nprobe} --seed {params.seed} --out {output.index:q} {input:q}"
        " > {log:q} 2>&1"


rule finetune_showo_faid:
    """FAiD blenders (and LoRA) on the Show-o backbone: one noising draw per training image, retrievals of its
    masked positions, Show-o's masked-token loss."""
    input:
        **SHOWO_TOKENIZERS,
        backbone=SHOWO_MODEL,
        images=FINETUNE_IMAGES,
        index=SHOWO_INDEX,
        sidecars=SHOWO_INDEX_SIDECARS,
        tokens=SHOWO_TOKENS,
    output:
        directory(f"{R}/models/showo_faid"),
    log:
        f"{LOGS}/finetune_showo_faid.log",
    benchmark:
        f"{LOGS}/finetune_showo_faid.benchmark.tsv"
    priority: CHAIN_PRIORITY
    conda:
        MAIN_ENV
    threads: 2
    resources:
        gpu=FINETUNE_GPUS,
    params:
        code=code_hash("finetune-showo-faid"),
        precision=config["precision"],
        launch=FINETUNE_LAUNCH,
        checkpoint=f"{R}/checkpoints/showo_faid",
        hops=SHOWO["faid"]["hops"],
        m=SHOWO["faid"]["m"],
        k=SHOWO["faid"]["k"],
        images=SHOWO["faid"]["max_images"],
        draws=SHOWO["faid"]["noise_draws"],
        dropout=SHOWO["faid"]["caption_dropout"],
        tuning=finetune_arguments(SHOWO["faid"]["finetune"]),
        device=config["device"],
        seed=config["seed"],
        tokenizers=lambda wildcards, input: [
            a
            for key in SHOWO_TOKENIZERS
            for a in (f"--{key.replace('_', '-')}", input[key])
        ],
    shell:
        "OMP_NUM_THREADS={threads} {params.launch:q} finetune-showo-faid --backbone {input.backbone:q}"
        " {params.tokenizers:q} --images {input.images:q} --tokens {input.tokens:q} --index {input.index:q}"
        " --hops {params.hops} --num-blenders {params.m} --k {params.k} --max-images {params.images}"
        " --noise-draws {params.draws} --caption-dropout {params.dropout} --out {output:q}"
        " --checkpoint {params.checkpoint:q} --device {params.device} {params.tuning:q} --seed {params.seed}"
        " --precision {params.precision} > {log:q} 2>&1"


if not SHAPES:

    rule encode_patches_showo:
        """MAGVIT-v2 token grids of one shard of the database images, for Show-o's O index."""
        input:
            images=DATABASE_IMAGES,
            vq=SHOWO_TOKENIZERS["tokenizer"],
            exclusions=f"{R}/index/exclusions.json",
        output:
            f"{R}/index_showo/shards/{{shard}}.npz",
        log:
            f"{LOGS}/encode_patches_showo/{{shard}}.log",
        benchmark:
            f"{LOGS}/encode_patches_showo/{{shard}}.benchmark.tsv"
        priority: CHAIN_PRIORITY
        conda:
            MAIN_ENV
        resources:
            gpu=1,
        params:
            code=code_hash("encode-patches"),
            shards=INDEX["shards"],
            size=SHOWO["image_size"],
            hops=SHOWO["index"]["hops"],
            edge=SHOWO["index"]["edge_policy"],
            batch_size=INDEX["batch_size"],
        shell:
            "OMP_NUM_THREADS={threads} python -m arrag.cli encode-patches --images {input.images:q} --vq {input.vq:q}"
            " --image-size {params.size} --exclusions {input.exclusions:q} --shard {wildcards.shard}"
            " --shards {params.shards} --neighbourhood O --hops {params.hops} --key-space codebook"
            " --edge-policy {params.edge} --batch-size {params.batch_size} --out {output:q} > {log:q} 2>&1"

    rule tokenize_split_showo:
        """MAGVIT-v2 tokens of the fine-tuning images, for FAiD on Show-o."""
        input:
            images=FINETUNE_IMAGES,
            vq=SHOWO_TOKENIZERS["tokenizer"],
        output:
            SHOWO_TOKENS,
        log:
            f"{LOGS}/tokenize_split_showo.log",
        benchmark:
            f"{LOGS}/tokenize_split_showo.benchmark.tsv"
        priority: CHAIN_PRIORITY
        conda:
            MAIN_ENV
        threads: 2
        resources:
            gpu=1,
        params:
            code=code_hash("tokenize"),
            size=SHOWO["image_size"],
            device=config["device"],
        shell:
            "OMP_NUM_THREADS={threads} python -m arrag.cli tokenize --images {input.images:q} --vq {input.vq:q}"
            " --size {params.size} --device {params.device} --out {output:q} > {log:q} 2>&1"
