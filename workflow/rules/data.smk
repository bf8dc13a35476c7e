# Data: the Shapes world and its benchmarks (scale: shapes); pinned downloads (scale: paper).
import json


rule shapes_split:
    """Render one split of the Shapes world (images, instance masks, annotations.jsonl)."""
    output:
        directory(f"{R}/shapes/{{split}}"),
    log:
        f"{LOGS}/shapes_split/{{split}}.log",
    conda:
        MAIN_ENV
    params:
        code=code_hash("shapes-world"),
        n_images=lambda wc: config["shapes"]["splits"][wc.split],
        seed=config["seed"],
        size=config["shapes"]["image_size"],
        supersample=config["shapes"]["supersample"],
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli shapes-world --split {wildcards.split} --count {params.n_images} --out {output:q}"
        " --seed {params.seed} --image-size {params.size} --supersample {params.supersample} > {log:q} 2>&1"


rule shapes_benchmarks:
    """GenEval / DPG-Bench / MJHQ files of the Shapes world, in the official formats, and vocabulary.json."""
    input:
        heldout=f"{R}/shapes/heldout",
    output:
        directory(f"{R}/benchmarks"),
    log:
        f"{LOGS}/shapes_benchmarks.log",
    conda:
        MAIN_ENV
    params:
        code=code_hash("shapes-benchmarks"),
        seed=config["seed"],
        size=config["shapes"]["image_size"],
        supersample=config["shapes"]["supersample"],
        per_tag=config["benchmarks"]["geneval"]["per_tag"],
        dpg=config["benchmarks"]["dpg"]["count"],
        mjhq=config["benchmarks"]["mjhq"]["count"],
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli shapes-benchmarks --heldout {input.heldout:q} --out {output:q} --seed {params.seed}"
        " --image-size {params.size} --supersample {params.supersample} --geneval-per-tag {params.per_tag}"
        " --dpg-prompts {params.dpg} --mjhq-images {params.mjhq} > {log:q} 2>&1"


if not SHAPES:
    # Paper scale: pinned downloads into resources/ (arrag/fetch.py). They run where the workflow runs
    # (localrule): cluster compute nodes often have no internet access. Downloads go through the cache
    # resources.cache, which is not an output, so a killed download resumes there.
    FETCH_OPTIONS = ["--cache", config["resources"]["cache"]] + (
        ["--allow-unpinned"] if config["resources"]["allow_unpinned"] else []
    )
    for _name, _spec in config["resources"]["benchmarks"].items():

        rule:
            name:
                f"fetch_{_name}"
            output:
                [fetched_file(f"{BENCHMARK_DIR}/{_name}", f) for f in _spec["files"]],
                manifest=f"{BENCHMARK_DIR}/{_name}/manifest.json",
            log:
                f"{LOGS}/fetch/{_name}.log",
            localrule: True
            conda:
                MAIN_ENV
            params:
                spec=json.dumps(_spec),
                key=f"resources.benchmarks.{_name}",
                out=lambda wildcards, output: os.path.dirname(output.manifest),
                options=FETCH_OPTIONS,
            shell:
                "python -m arrag.cli fetch benchmark --spec {params.spec:q} --key {params.key} --out {params.out:q}"
                " {params.options:q} > {log:q} 2>&1"

    rule fetch_backbone:
        """The backbone's hub snapshot (backbone.source at backbone.revision) with a manifest of its files."""
        output:
            directory(BACKBONE),
        log:
            f"{LOGS}/fetch/backbone.log",
        localrule: True
        conda:
            MAIN_ENV
        params:
            repo=config["backbone"]["source"],
            revision=config["backbone"]["revision"] or "",
            options=FETCH_OPTIONS,
        shell:
            "python -m arrag.cli fetch backbone --repo {params.repo:q} --revision={params.revision:q} --key backbone"
            " --out {output:q} {params.options:q} > {log:q} 2>&1"

    SHOWO_FETCHED = {
        "showo": "model",
        "showo_tokenizer": "tokenizer",
        "showo_text_tokenizer": "text_tokenizer",
    }

    rule fetch_showo_model:
        """Show-o's hub snapshots (showo.model, showo.tokenizer: MAGVIT-v2, showo.text_tokenizer: its files listed in
        showo.text_tokenizer.include) with manifests."""
        output:
            directory("resources/models/{name}"),
        log:
            f"{LOGS}/fetch/{{name}}.log",
        wildcard_constraints:
            name="|".join(SHOWO_FETCHED),
        localrule: True
        conda:
            MAIN_ENV
        params:
            repo=lambda wc: config["showo"][SHOWO_FETCHED[wc.name]]["source"],
            revision=lambda wc: config["showo"][SHOWO_FETCHED[wc.name]]["revision"]
            or "",
            key=lambda wc: f"showo.{SHOWO_FETCHED[wc.name]}",
            include=lambda wc: (
                ["--include", *config["showo"]["text_tokenizer"]["include"]]
                if wc.name == "showo_text_tokenizer"
                else []
            ),
            options=FETCH_OPTIONS,
        shell:
            "python -m arrag.cli fetch backbone --repo {params.repo:q} --revision={params.revision:q} --key {params.key}"
            " {params.include:q} --out {output:q} {params.options:q} > {log:q} 2>&1"

    rule finetune_split:
        """The fine-tuning image-caption pairs (Appendix B.3) from the fetched fine-tuning datasets, each image's
        source, id and sha256 in annotations.jsonl (the exclusion list reads them).
        """
        input:
            "resources/datasets/finetune",
        output:
            directory(FINETUNE_IMAGES),
        log:
            f"{LOGS}/finetune_split.log",
        benchmark:
            f"{LOGS}/finetune_split.benchmark.tsv"
        conda:
            MAIN_ENV
        params:
            code=code_hash("finetune-split"),
            size=config["resources"]["finetune_image_size"],
        shell:
            "OMP_NUM_THREADS={threads} python -m arrag.cli finetune-split --sources {input:q} --out {output:q}"
            " --image-size {params.size} > {log:q} 2>&1"

    rule fetch_datasets:
        """The image datasets of the patch database or of fine-tuning, subsampled by files, with sources.json."""
        output:
            directory("resources/datasets/{role}"),
        log:
            f"{LOGS}/fetch/datasets_{{role}}.log",
        wildcard_constraints:
            role="database|finetune",
        localrule: True
        conda:
            MAIN_ENV
        params:
            spec=json.dumps(config["resources"]["datasets"]),
            subsample=config["resources"]["subsample"],
            seed=config["seed"],
            options=FETCH_OPTIONS,
        shell:
            "python -m arrag.cli fetch datasets --role {wildcards.role} --spec {params.spec:q} --key resources.datasets"
            " --subsample {params.subsample} --seed {params.seed} --out {output:q} {params.options:q} > {log:q} 2>&1"
