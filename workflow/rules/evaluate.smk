# Evaluation: every metric is a `python -m evaluators` call writing one result record (JSON).


rule image_metric:
    """FID / CMMD / FWD of generated MJHQ-style images against the reference images."""
    input:
        unpack(lambda wc: {**benchmark_files(), **(cmmd_model_args() if wc.metric == "cmmd" else {})}),
        record=generated,
    output:
        f"{R}/metrics/{{bench}}/{{method}}/{{variant}}/{{metric}}.json",
    wildcard_constraints:
        bench="mjhq|mjhq_ablation",
        metric="fid|cmmd|fwd",
    params:
        images=generated_images,
        real=benchmark_path("mjhq_images"),
        seed=config["seed"],
        config_hash=CONFIG_HASH,
    conda:
        MAIN_ENV
    log:
        f"{LOGS}/metrics/{{bench}}/{{method}}/{{variant}}/{{metric}}.log",
    shell:
        "python -m evaluators {wildcards.metric} {params.real:q} {params.images:q} --out {output:q}"
        " --seed {params.seed} --config-hash {params.config_hash} > {log:q} 2>&1"


rule geneval_score:
    """GenEval: detector + official rules on the generated folder (<index>/metadata.jsonl + samples)."""
    input:
        unpack(benchmark_files),
        record=generated,
    output:
        f"{R}/metrics/{{bench}}/{{method}}/{{variant}}/geneval.json",
    wildcard_constraints:
        bench="geneval",
    params:
        images=generated_images,
        backend=config["evaluation"]["geneval_backend"],
        vocabulary=f"{BENCHMARK_DIR}/vocabulary.json",
        seed=config["seed"],
        config_hash=CONFIG_HASH,
    conda:
        GENEVAL_ENV
    log:
        f"{LOGS}/metrics/{{bench}}/{{method}}/{{variant}}/geneval.log",
    shell:
        "python -m evaluators geneval {params.images:q} --backend {params.backend} --vocabulary {params.vocabulary:q}"
        " --out {output:q} --seed {params.seed} --config-hash {params.config_hash} > {log:q} 2>&1"


rule dpg_score:
    """DPG-Bench: VQA over 2x2 grid crops, dependency-aware scoring."""
    input:
        unpack(benchmark_files),
        record=generated,
    output:
        f"{R}/metrics/{{bench}}/{{method}}/{{variant}}/dpg.json",
    wildcard_constraints:
        bench="dpg",
    params:
        images=generated_images,
        questions=benchmark_path("dpg_questions"),
        backend=config["evaluation"]["dpg_backend"],
        vocabulary=f"{BENCHMARK_DIR}/vocabulary.json",
        seed=config["seed"],
        config_hash=CONFIG_HASH,
    conda:
        DPG_ENV
    log:
        f"{LOGS}/metrics/{{bench}}/{{method}}/{{variant}}/dpg.log",
    shell:
        "python -m evaluators dpg {params.images:q} --questions {params.questions:q} --backend {params.backend}"
        " --vocabulary {params.vocabulary:q} --out {output:q} --seed {params.seed}"
        " --config-hash {params.config_hash} > {log:q} 2>&1"


rule select:
    """Pick the ablation cell with the lowest FID on the ablation subset (unless the config pins values)."""
    input:
        lambda wc: expand(
            f"{R}/metrics/mjhq_ablation/{wc.method}/{{variant}}/fid.json",
            variant=daid_variants() if wc.method == "daid" else faid_variants(),
        ),
    output:
        f"{R}/selection/{{method}}.json",
    wildcard_constraints:
        method="daid|faid",
    conda:
        MAIN_ENV
    log:
        f"{LOGS}/select/{{method}}.log",
    shell:
        "python -m arrag.cli select --method {wildcards.method} --out {output:q} {input:q} > {log:q} 2>&1"
