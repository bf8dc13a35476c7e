# The patch-level retrieval database (§3.1): exclusion list -> encode shards -> train the index once -> add
# each shard -> merge; then the retrieval-accuracy analysis (Appendix C.1, Figure 6).
# The index takes the VQ from the Shapes VQ folder (so it does not wait for the backbone) or, at paper scale,
# from the backbone (its `vqmodel`); the VQ in the Shapes backbone is that same frozen VQ (the fingerprint's
# codebook hash is equal), so DAiD / FAiD loading the index with the backbone's codebook passes the check.
INDEX = config["index"]
INDEX_VQ = f"{R}/models/vq" if SHAPES else BACKBONE
VQ_REVISION = (
    ""
    if SHAPES or not config["backbone"]["revision"]
    else f"--revision {config['backbone']['revision']}"
)
INDEX_KEY_ARGS = (
    f"--neighbourhood {INDEX['neighbourhood']} --hops {INDEX['hops']} --key-space {INDEX['key_space']}"
    f" --edge-policy {INDEX['edge_policy']}"
)
# Leakage (§4): benchmark references and fine-tuning images never enter the database.
EXCLUDED_IMAGES = (
    [f"{R}/shapes/heldout", FINETUNE_IMAGES, BENCHMARK_DIR]
    if SHAPES
    else [MJHQ_IMAGES, FINETUNE_IMAGES]
)

if INDEX["ondisk"] and INDEX["type"] != "ivfpq":
    raise WorkflowError(
        f"index.ondisk applies to index.type ivfpq only, not {INDEX['type']!r}: set ondisk: false"
    )
if INDEX["type"] == "tokens" and INDEX["key_space"] != "codebook":
    raise WorkflowError(
        "index.type 'tokens' stores codebook-space keys: use index.key_space 'codebook', "
        "or index.type flat / ivfpq for latent keys"
    )


rule patch_exclusions:
    """Ids and sha256 of the images kept out of the patch database."""
    input:
        EXCLUDED_IMAGES,
    output:
        f"{R}/index/exclusions.json",
    log:
        f"{LOGS}/patch_exclusions.log",
    conda:
        MAIN_ENV
    params:
        code=code_hash("exclusion-list"),
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli exclusion-list --out {output:q} {input:q} > {log:q} 2>&1"


rule encode_patches:
    """Token grids (and latents) of one shard of the database images."""
    input:
        images=DATABASE_IMAGES,
        vq=INDEX_VQ,
        exclusions=f"{R}/index/exclusions.json",
    output:
        f"{R}/index/shards/{{shard}}.npz",
    log:
        f"{LOGS}/encode_patches/{{shard}}.log",
    benchmark:
        f"{LOGS}/encode_patches/{{shard}}.benchmark.tsv"
    priority: CHAIN_PRIORITY
    conda:
        MAIN_ENV
    resources:
        gpu=0 if SHAPES else 1,
    params:
        code=code_hash("encode-patches"),
        shards=INDEX["shards"],
        key_args=INDEX_KEY_ARGS,
        batch_size=INDEX["batch_size"],
        revision=VQ_REVISION,
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli encode-patches --images {input.images:q} --vq {input.vq:q}"
        " {params.revision} --exclusions {input.exclusions:q} --shard {wildcards.shard}"
        " --shards {params.shards} {params.key_args} --batch-size {params.batch_size} --out {output:q} > {log:q} 2>&1"


rule train_index:
    """Train the index on all shards (flat / tokens: nothing to learn; ivfpq: OPQ + IVF-PQ on a sample)."""
    input:
        expand(f"{R}/index/shards/{{shard}}.npz", shard=INDEX_SHARDS),
    output:
        index=f"{R}/index/trained.{INDEX_SUFFIX}",
        meta=f"{R}/index/trained.{INDEX_SUFFIX}.json",
    log:
        f"{LOGS}/train_index.log",
    benchmark:
        f"{LOGS}/train_index.benchmark.tsv"
    conda:
        MAIN_ENV
    params:
        code=code_hash("train-index"),
        kind=INDEX["type"],
        ivf=f"--nlist {INDEX['nlist']} --pq-m {INDEX['pq_m']} --nprobe {INDEX['nprobe']} --train-size {INDEX['train_size']}"
        + (" --official-nprobe" if INDEX["official_nprobe"] else ""),
        seed=config["seed"],
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli train-index --type {params.kind} {params.ivf} --seed {params.seed}"
        " --out {output.index:q} {input:q} > {log:q} 2>&1"


rule add_shard:
    """One shard's patches under global patch ids."""
    input:
        trained=f"{R}/index/trained.{INDEX_SUFFIX}",
        meta=f"{R}/index/trained.{INDEX_SUFFIX}.json",
        shard=f"{R}/index/shards/{{shard}}.npz",
    output:
        index=f"{R}/index/added/{{shard}}.{INDEX_SUFFIX}",
        meta=f"{R}/index/added/{{shard}}.{INDEX_SUFFIX}.json",
    log:
        f"{LOGS}/add_shard/{{shard}}.log",
    benchmark:
        f"{LOGS}/add_shard/{{shard}}.benchmark.tsv"
    conda:
        MAIN_ENV
    params:
        code=code_hash("add-shard"),
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli add-shard --trained {input.trained:q} --shard {input.shard:q}"
        " --out {output.index:q} > {log:q} 2>&1"


rule merge_index:
    """Merge the per-shard indexes; the fingerprint (.json), values (.values.npz) and, for an ivfpq index merged
    on disk, the inverted lists (.ivfdata) go beside the index."""
    input:
        added=expand(f"{R}/index/added/{{shard}}.{INDEX_SUFFIX}", shard=INDEX_SHARDS),
        meta=expand(
            f"{R}/index/added/{{shard}}.{INDEX_SUFFIX}.json", shard=INDEX_SHARDS
        ),
        shards=expand(f"{R}/index/shards/{{shard}}.npz", shard=INDEX_SHARDS),
    output:
        index=INDEX_FILE,
        sidecars=INDEX_SIDECARS,
    log:
        f"{LOGS}/merge_index.log",
    benchmark:
        f"{LOGS}/merge_index.benchmark.tsv"
    conda:
        MAIN_ENV
    params:
        code=code_hash("merge-index"),
        ondisk="--ondisk" if INDEX["ondisk"] else "",
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli merge-index --added {input.added:q} --shards {input.shards:q}"
        " {params.ondisk} --out {output.index:q} > {log:q} 2>&1"


rule retrieval_analysis:
    """Appendix C.1 / Figure 6: distance between the ground-truth token and the k-th retrieved token."""
    input:
        index=INDEX_FILE,
        sidecars=INDEX_SIDECARS,
        vq=INDEX_VQ,
        images=f"{R}/shapes/heldout" if SHAPES else FINETUNE_IMAGES,
    output:
        csv=report(f"{R}/analysis/retrieval_accuracy.csv", category="Patch retrieval"),
        png=report(f"{R}/analysis/retrieval_accuracy.png", category="Patch retrieval"),
    log:
        f"{LOGS}/retrieval_analysis.log",
    benchmark:
        f"{LOGS}/retrieval_analysis.benchmark.tsv"
    conda:
        MAIN_ENV
    resources:
        gpu=0 if SHAPES else 1,
    params:
        code=code_hash("retrieval-analysis"),
        limit=INDEX["analysis_images"],
        k=INDEX["analysis_k"],
        seed=config["seed"],
        revision=VQ_REVISION,
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli retrieval-analysis --index {input.index:q} --vq {input.vq:q}"
        " {params.revision} --images {input.images:q} --limit {params.limit} --k {params.k}"
        " --seed {params.seed} --csv {output.csv:q} --png {output.png:q} > {log:q} 2>&1"
