# The patch-level retrieval database (§3.1): encode shards -> train the index -> add shards -> merge.


rule encode_patches:
    """Keys (n-hop neighbourhoods) and values (tokens, image ids, positions) of one shard of images."""
    input:
        images=DATABASE_IMAGES,
        backbone=BACKBONE,
    output:
        f"{R}/index/shards/{{shard}}.npz",
    params:
        shards=config["index"]["shards"],
        neighbourhood=config["index"]["neighbourhood"],
        hops=config["index"]["hops"],
        key_space=config["index"]["key_space"],
        edge_policy=config["index"]["edge_policy"],
    conda:
        MAIN_ENV
    log:
        f"{LOGS}/encode_patches/{{shard}}.log",
    shell:
        "python -m arrag.cli encode-patches --images {input.images:q} --backbone {input.backbone:q} --shard {wildcards.shard}"
        " --shards {params.shards} --neighbourhood {params.neighbourhood} --hops {params.hops}"
        " --key-space {params.key_space} --edge-policy {params.edge_policy} --out {output:q} > {log:q} 2>&1"


rule train_index:
    """Train the FAISS index (flat: nothing to learn; OPQ + IVF-PQ: on a sample of the shards)."""
    input:
        expand(f"{R}/index/shards/{{shard}}.npz", shard=INDEX_SHARDS),
    output:
        f"{R}/index/trained.faiss",
    params:
        kind=config["index"]["type"],
    conda:
        MAIN_ENV
    log:
        f"{LOGS}/train_index.log",
    shell:
        "python -m arrag.cli train-index --type {params.kind} --out {output:q} {input:q} > {log:q} 2>&1"


rule add_shard:
    input:
        trained=f"{R}/index/trained.faiss",
        shard=f"{R}/index/shards/{{shard}}.npz",
    output:
        f"{R}/index/added/{{shard}}.faiss",
    conda:
        MAIN_ENV
    log:
        f"{LOGS}/add_shard/{{shard}}.log",
    shell:
        "python -m arrag.cli add-shard --trained {input.trained:q} --shard {input.shard:q} --out {output:q} > {log:q} 2>&1"


rule merge_index:
    """Merge the per-shard indexes and store the index fingerprint beside it."""
    input:
        expand(f"{R}/index/added/{{shard}}.faiss", shard=INDEX_SHARDS),
    output:
        f"{R}/index/index.faiss",
    conda:
        MAIN_ENV
    log:
        f"{LOGS}/merge_index.log",
    shell:
        "python -m arrag.cli merge-index --out {output:q} {input:q} > {log:q} 2>&1"


rule retrieval_analysis:
    """Appendix C.1 / Figure 6: distance between the ground-truth token and the k-th retrieved token."""
    input:
        index=f"{R}/index/index.faiss",
        backbone=BACKBONE,
        images=f"{R}/shapes/heldout" if SHAPES else FINETUNE_IMAGES,
    output:
        csv=f"{R}/analysis/retrieval_accuracy.csv",
        png=f"{R}/analysis/retrieval_accuracy.png",
    conda:
        MAIN_ENV
    log:
        f"{LOGS}/retrieval_analysis.log",
    shell:
        "python -m arrag.cli retrieval-analysis --index {input.index:q} --backbone {input.backbone:q}"
        " --images {input.images:q} --csv {output.csv:q} --png {output.png:q} > {log:q} 2>&1"
