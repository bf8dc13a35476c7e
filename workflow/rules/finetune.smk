# Fine-tuning: FAiD blenders (one fine-tune per ablation cell) and the RA-CM3 baseline.


rule precompute_retrievals:
    """Top-k retrievals for every position of one shard of the fine-tuning images (held out of the index)."""
    input:
        index=INDEX_FILE,
        index_sidecars=INDEX_SIDECARS,
        backbone=BACKBONE,
        images=FINETUNE_IMAGES,
        tokens=SPLIT_TOKENS,
    output:
        f"{R}/faid/retrievals/{{shard}}.npz",
    log:
        f"{LOGS}/precompute_retrievals/{{shard}}.log",
    benchmark:
        f"{LOGS}/precompute_retrievals/{{shard}}.benchmark.tsv"
    priority: CHAIN_PRIORITY
    conda:
        MAIN_ENV
    resources:
        gpu=0 if SHAPES else 1,
    params:
        code=code_hash("precompute-retrievals"),
        k=config["faid"]["k"],
        shards=config["index"]["shards"],
        max_images=config["faid"]["max_images"],
        device=config["device"],
        revision=config["backbone"]["revision"] or "",
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli precompute-retrievals --index {input.index:q} --backbone {input.backbone:q}"
        " --revision={params.revision:q} --images {input.images:q} --tokens {input.tokens:q} --k {params.k}"
        " --shard {wildcards.shard} --shards {params.shards} --max-images {params.max_images}"
        " --device {params.device} --out {output:q} > {log:q} 2>&1"


rule finetune_faid:
    """Teacher-forced training of the blenders (backbone frozen, optional LoRA) for one (hops, m) cell."""
    input:
        backbone=BACKBONE,
        images=FINETUNE_IMAGES,
        retrievals=expand(f"{R}/faid/retrievals/{{shard}}.npz", shard=INDEX_SHARDS),
    output:
        directory(f"{R}/models/faid/hops{{hops}}_m{{m}}"),
    log:
        f"{LOGS}/finetune_faid/hops{{hops}}_m{{m}}.log",
    benchmark:
        f"{LOGS}/finetune_faid/hops{{hops}}_m{{m}}.benchmark.tsv"
    wildcard_constraints:
        hops=r"[1-9]+",
        m=r"\d+",
    priority: CHAIN_PRIORITY
    conda:
        MAIN_ENV
    threads: 2
    resources:
        gpu=FINETUNE_GPUS,
    params:
        code=code_hash("finetune-faid"),
        precision=config["precision"],
        launch=FINETUNE_LAUNCH,
        checkpoint=lambda wc: f"{R}/checkpoints/faid/hops{wc.hops}_m{wc.m}",
        device=config["device"],
        revision=config["backbone"]["revision"] or "",
        k=config["faid"]["k"],
        dropout=config["faid"]["caption_dropout"],
        init=config["faid"]["init"],
        max_images=config["faid"]["max_images"],
        tuning=finetune_arguments(config["faid"]["finetune"]),
        seed=config["seed"],
    shell:
        "OMP_NUM_THREADS={threads} {params.launch:q} finetune-faid --backbone {input.backbone:q} --revision={params.revision:q}"
        " --images {input.images:q} --hops {wildcards.hops} --num-blenders {wildcards.m} --k {params.k} --out {output:q}"
        " --checkpoint {params.checkpoint:q} --device {params.device} --caption-dropout {params.dropout} --init {params.init}"
        " --max-images {params.max_images}"
        " {params.tuning:q}"
        " --seed {params.seed} {input.retrievals:q} --precision {params.precision} > {log:q} 2>&1"


rule build_clip_index:
    """RA-CM3 (Appendix B.1): CLIP image embeddings of the database images in an inner-product index."""
    input:
        images=DATABASE_IMAGES,
        clip=SHAPES_CLIP if config["racm3"]["clip_model"] == "shapes" else [],
    output:
        directory(f"{R}/racm3/clip_index"),
    log:
        f"{LOGS}/build_clip_index.log",
    benchmark:
        f"{LOGS}/build_clip_index.benchmark.tsv"
    priority: CHAIN_PRIORITY
    conda:
        MAIN_ENV
    threads: 2
    resources:
        gpu=0 if SHAPES else 1,
    params:
        code=code_hash("build-clip-index"),
        clip=open_clip_args(
            config["racm3"]["clip_model"], config["racm3"]["clip_pretrained"]
        ),
        device=config["device"],
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli build-clip-index --images {input.images:q} {params.clip:q}"
        " --device {params.device} --out {output:q} > {log:q} 2>&1"


rule finetune_racm3:
    """RA-CM3: fine-tune the backbone (LoRA) with the retrieved image's tokens prepended to the prompt."""
    input:
        backbone=BACKBONE,
        images=FINETUNE_IMAGES,
        tokens=SPLIT_TOKENS,
        clip_index=f"{R}/racm3/clip_index",
    output:
        directory(f"{R}/models/racm3"),
    log:
        f"{LOGS}/finetune_racm3.log",
    benchmark:
        f"{LOGS}/finetune_racm3.benchmark.tsv"
    priority: CHAIN_PRIORITY
    conda:
        MAIN_ENV
    threads: 2
    resources:
        gpu=FINETUNE_GPUS,
    params:
        code=code_hash("finetune-racm3"),
        precision=config["precision"],
        launch=FINETUNE_LAUNCH,
        checkpoint=f"{R}/checkpoints/racm3",
        device=config["device"],
        revision=config["backbone"]["revision"] or "",
        top_n=config["racm3"]["top_n"],
        dropout=config["racm3"]["caption_dropout"],
        tuning=finetune_arguments(config["racm3"]["finetune"]),
        seed=config["seed"],
    shell:
        "OMP_NUM_THREADS={threads} {params.launch:q} finetune-racm3 --backbone {input.backbone:q} --images {input.images:q}"
        " --tokens {input.tokens:q}"
        " --clip-index {input.clip_index:q} --out {output:q} --checkpoint {params.checkpoint:q} --device {params.device}"
        " --revision={params.revision:q} --top-n {params.top_n} --caption-dropout {params.dropout} {params.tuning:q}"
        " --seed {params.seed} --precision {params.precision} > {log:q} 2>&1"
