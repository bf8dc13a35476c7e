# Generation: prompts -> images in each benchmark's layout, as shards (scatter) and a record (gather).
# Images of all shards land in one folder, each written atomically; a shard's record lists its files.


rule generate:
    """One shard (i of N) of one benchmark with one method and variant; resumable."""
    input:
        unpack(lambda wc: {**method_inputs(wc), **benchmark_files()}),
        backbone=generation_backbone,
        index_sidecars=index_sidecars,
    output:
        f"{R}/generated/{{bench}}/{{method}}/{{variant}}/shards/{{shard}}.json",
    log:
        f"{LOGS}/generate/{{bench}}/{{method}}/{{variant}}/{{shard}}.log",
    benchmark:
        f"{LOGS}/generate/{{bench}}/{{method}}/{{variant}}/{{shard}}.benchmark.tsv"
    conda:
        MAIN_ENV
    threads: EVAL_THREADS
    resources:
        gpu=0 if SHAPES else 1,
    params:
        code=code_hash("generate"),
        precision=config["precision"],
        prompts=prompt_source,
        images=lambda wc: f"{R}/generated/{wc.bench}/{wc.method}/{wc.variant}/images",
        shards=lambda wc: config["sampling"]["shards"][wc.bench],
        seed=config["seed"],
        sampling=sampling_arguments,
        temperature=config["sampling"]["temperature"],
        micro_batch=config["sampling"]["micro_batch"],
        device=config["device"],
        revision=lambda wc: (
            ""
            if wc.method.startswith("showo")
            else config["backbone"]["revision"] or ""
        ),
        samples=config["benchmarks"]["geneval"]["samples_per_prompt"],
        subset=config["benchmarks"]["mjhq"]["ablation_subset"],
        method=lambda wc, input: method_arguments(wc, input),
        daid_k=config["daid"]["k"],
        daid_retrieval=config["daid"]["retrieval"],
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli generate --benchmark {wildcards.bench} --prompts {params.prompts:q} --method {wildcards.method}"
        " --variant {wildcards.variant} --backbone {input.backbone:q} --shard {wildcards.shard}"
        " --revision={params.revision:q} --device {params.device} --shards {params.shards} --seed {params.seed}"
        " {params.sampling:q} --temperature {params.temperature}"
        " --micro-batch {params.micro_batch} --samples-per-prompt {params.samples} --ablation-subset {params.subset}"
        " {params.method:q} --daid-k {params.daid_k} --daid-retrieval {params.daid_retrieval} --images {params.images:q} --record {output:q} --precision {params.precision} > {log:q} 2>&1"


rule gather_generation:
    """All shards of a (benchmark, method, variant): their records merged (timings for Table 4)."""
    input:
        lambda wc: expand(
            f"{R}/generated/{wc.bench}/{wc.method}/{wc.variant}/shards/{{shard}}.json",
            shard=range(config["sampling"]["shards"][wc.bench]),
        ),
    output:
        record=f"{R}/generated/{{bench}}/{{method}}/{{variant}}/record.json",
        grid=report(
            f"{R}/generated/{{bench}}/{{method}}/{{variant}}/sample_grid.png",
            caption="../report/sample_grid.rst",
            category="Sample grids",
            subcategory="{bench}",
            labels={"method": "{method}", "variant": "{variant}"},
        ),
    log:
        f"{LOGS}/gather_generation/{{bench}}/{{method}}/{{variant}}.log",
    conda:
        MAIN_ENV
    params:
        code=code_hash("generate"),
        images=lambda wc: f"{R}/generated/{wc.bench}/{wc.method}/{wc.variant}/images",
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli generate --gather --record {output.record:q} --images {params.images:q} {input:q}"
        " > {log:q} 2>&1"
