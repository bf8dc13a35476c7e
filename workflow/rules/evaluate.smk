# Evaluation: every metric is a `python -m evaluators` call writing one result record (JSON).


rule image_metric:
    """FID / CMMD / FWD of generated MJHQ-style images against the reference images."""
    input:
        unpack(
            lambda wc: {
                **benchmark_files(),
                **(cmmd_model_args() if wc.metric == "cmmd" else {}),
            }
        ),
        record=generated,
    output:
        f"{R}/metrics/{{bench}}/{{method}}/{{variant}}/{{metric}}.json",
    log:
        f"{LOGS}/metrics/{{bench}}/{{method}}/{{variant}}/{{metric}}.log",
    benchmark:
        f"{LOGS}/metrics/{{bench}}/{{method}}/{{variant}}/{{metric}}.benchmark.tsv"
    wildcard_constraints:
        bench="mjhq|mjhq_ablation",
        metric="fid|cmmd|fwd",
    conda:
        MAIN_ENV
    threads: EVAL_THREADS
    resources:
        gpu=0 if SHAPES else 1,
    params:
        code=lambda wc: code_hash(f"eval:{wc.metric}"),
        images=generated_images,
        real=benchmark_path("mjhq_images"),
        clip=lambda wc: (
            open_clip_args(
                config["evaluation"]["cmmd_model"],
                config["evaluation"]["cmmd_pretrained"],
            )
            if wc.metric == "cmmd"
            else []
        ),
        fwd=lambda wc: fwd_args() if wc.metric == "fwd" else [],
        per_category=lambda wc: (
            []
            if wc.metric != "fid"
            or (wc.bench == "mjhq" and config["evaluation"]["fid_per_category"])
            else ["--no-per-category"]
        ),
        seed=config["seed"],
    shell:
        "OMP_NUM_THREADS={threads} python -m evaluators {wildcards.metric} {params.real:q} {params.images:q} --out {output:q}"
        " {params.clip:q} {params.fwd:q} {params.per_category:q} --seed {params.seed} --generation-record {input.record:q} > {log:q} 2>&1"


rule geneval_score:
    """GenEval: detector + official rules on the generated folder (<index>/metadata.jsonl + samples)."""
    input:
        unpack(benchmark_files),
        record=generated,
        clip=(
            SHAPES_CLIP
            if config["evaluation"]["geneval_clip_model"] == "shapes"
            else []
        ),
    output:
        f"{R}/metrics/{{bench}}/{{method}}/{{variant}}/geneval.json",
    log:
        f"{LOGS}/metrics/{{bench}}/{{method}}/{{variant}}/geneval.log",
    benchmark:
        f"{LOGS}/metrics/{{bench}}/{{method}}/{{variant}}/geneval.benchmark.tsv"
    wildcard_constraints:
        bench="geneval",
    conda:
        GENEVAL_ENV
    resources:
        gpu=0 if SHAPES else 1,
    params:
        code=code_hash("eval:geneval"),
        images=generated_images,
        backend=geneval_backend_args(),
        seed=config["seed"],
    shell:
        "OMP_NUM_THREADS={threads} python -m evaluators geneval {params.images:q} {params.backend:q}"
        " --out {output:q} --seed {params.seed} --generation-record {input.record:q} > {log:q} 2>&1"


rule dpg_score:
    """DPG-Bench: VQA over 2x2 grid crops, dependency-aware scoring."""
    input:
        unpack(benchmark_files),
        record=generated,
    output:
        f"{R}/metrics/{{bench}}/{{method}}/{{variant}}/dpg.json",
    log:
        f"{LOGS}/metrics/{{bench}}/{{method}}/{{variant}}/dpg.log",
    benchmark:
        f"{LOGS}/metrics/{{bench}}/{{method}}/{{variant}}/dpg.benchmark.tsv"
    wildcard_constraints:
        bench="dpg",
    conda:
        DPG_ENV
    resources:
        gpu=0 if SHAPES else 1,
    params:
        code=code_hash("eval:dpg"),
        images=generated_images,
        questions=benchmark_path("dpg_questions"),
        backend=dpg_backend_args(),
        seed=config["seed"],
    shell:
        "OMP_NUM_THREADS={threads} python -m evaluators dpg {params.images:q} --questions {params.questions:q} {params.backend:q}"
        " --out {output:q} --seed {params.seed}"
        " --generation-record {input.record:q} > {log:q} 2>&1"


rule select:
    """Pick the ablation cell with the lowest FID on the ablation subset (unless the config pins values)."""
    input:
        lambda wc: expand(
            f"{R}/metrics/mjhq_ablation/{wc.method}/{{variant}}/fid.json",
            variant=daid_variants() if wc.method == "daid" else faid_variants(),
        ),
    output:
        f"{R}/selection/{{method}}.json",
    log:
        f"{LOGS}/select/{{method}}.log",
    wildcard_constraints:
        method="daid|faid",
    conda:
        MAIN_ENV
    params:
        code=code_hash("select"),
        pinned=lambda wc: pinned_values(wc.method),
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli select --method {wildcards.method} --out {output:q} {params.pinned:q} {input:q} > {log:q} 2>&1"


rule check_shapes_detector:
    """The Shapes detector against ground truth: clean held-out renders, or their VQ reconstructions."""
    input:
        split=f"{R}/shapes/heldout",
        benchmarks=BENCHMARK_DIR,
        images=lambda wc: f"{R}/checks/vq_reconstructions" if wc.kind == "vq" else [],
    output:
        f"{R}/checks/detector_{{kind}}.json",
    log:
        f"{LOGS}/checks/detector_{{kind}}.log",
    wildcard_constraints:
        kind="clean|vq",
    conda:
        MAIN_ENV
    params:
        code=code_hash("eval:geneval"),
        images=lambda wc, input: (
            ["--validate-images", input.images] if wc.kind == "vq" else []
        ),
    shell:
        "OMP_NUM_THREADS={threads} python -m evaluators geneval --validate-shapes {input.split:q}"
        " --vocabulary {input.benchmarks:q}/vocabulary.json {params.images:q} --out {output:q} > {log:q} 2>&1"


rule check_dpg_vqa:
    """The Shapes VQA answers every question of the DPG-style truth renders."""
    input:
        BENCHMARK_DIR,
    output:
        f"{R}/checks/dpg_vqa_truth.json",
    log:
        f"{LOGS}/checks/dpg_vqa_truth.log",
    conda:
        MAIN_ENV
    params:
        code=code_hash("eval:dpg"),
    shell:
        "OMP_NUM_THREADS={threads} python -m evaluators dpg --validate-shapes {input:q}/dpg_bench/truth"
        " --questions {input:q}/dpg_bench/dpg_bench.csv --vocabulary {input:q}/vocabulary.json --out {output:q}"
        " > {log:q} 2>&1"


rule vq_reconstructions:
    """decode(encode(x)) of held-out renders: what the evaluators see in generated images."""
    input:
        vq=f"{R}/models/vq",
        split=f"{R}/shapes/heldout",
    output:
        directory(f"{R}/checks/vq_reconstructions"),
    log:
        f"{LOGS}/checks/vq_reconstructions.log",
    conda:
        MAIN_ENV
    params:
        code=code_hash("vq-reconstruct"),
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli vq-reconstruct --vq {input.vq:q} --split {input.split:q}"
        " --out {output:q} > {log:q} 2>&1"
