# Data: the Shapes world and its benchmarks (scale: shapes); pinned downloads (scale: paper).


rule shapes_split:
    """Render one split of the Shapes world (images, instance masks, annotations.jsonl)."""
    output:
        directory(f"{R}/shapes/{{split}}"),
    params:
        n_images=lambda wc: config["shapes"]["splits"][wc.split],
        seed=config["seed"],
        size=config["shapes"]["image_size"],
        supersample=config["shapes"]["supersample"],
    conda:
        MAIN_ENV
    log:
        f"{LOGS}/shapes_split/{{split}}.log",
    shell:
        "python -m arrag.cli shapes-world --split {wildcards.split} --count {params.n_images} --out {output:q}"
        " --seed {params.seed} --image-size {params.size} --supersample {params.supersample} > {log:q} 2>&1"


rule shapes_benchmarks:
    """GenEval / DPG-Bench / MJHQ files of the Shapes world, in the official formats, and vocabulary.json."""
    input:
        heldout=f"{R}/shapes/heldout",
    output:
        directory(f"{R}/benchmarks"),
    params:
        seed=config["seed"],
        size=config["shapes"]["image_size"],
        supersample=config["shapes"]["supersample"],
        per_tag=config["benchmarks"]["geneval"]["per_tag"],
        dpg=config["benchmarks"]["dpg"]["count"],
        mjhq=config["benchmarks"]["mjhq"]["count"],
    conda:
        MAIN_ENV
    log:
        f"{LOGS}/shapes_benchmarks.log",
    shell:
        "python -m arrag.cli shapes-benchmarks --heldout {input.heldout:q} --out {output:q} --seed {params.seed}"
        " --image-size {params.size} --supersample {params.supersample} --geneval-per-tag {params.per_tag}"
        " --dpg-prompts {params.dpg} --mjhq-images {params.mjhq} > {log:q} 2>&1"


if not SHAPES:

    rule fetch_resources:
        """Paper scale: benchmarks, model and datasets from pinned revisions into resources/."""
        output:
            GENEVAL_METADATA,
            directory(DPG_PROMPTS),
            DPG_QUESTIONS,
            MJHQ_META,
            directory(MJHQ_IMAGES),
            backbone=directory(BACKBONE),
            database=directory(DATABASE_IMAGES),
            finetune=directory(FINETUNE_IMAGES),
        conda:
            MAIN_ENV
        log:
            f"{LOGS}/fetch_resources.log",
        shell:
            "python -m arrag.cli fetch > {log:q} 2>&1"
