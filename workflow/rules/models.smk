# Models trained in the DAG: the Shapes-world VQ, Janus language model and CLIP.


rule train_shapes_vq:
    """A tiny JanusVQVAE trained on the database split (64x64 images -> 8x8 token grid)."""
    input:
        images=f"{R}/shapes/database",
        heldout=f"{R}/shapes/heldout",
    output:
        directory(f"{R}/models/vq"),
    log:
        f"{LOGS}/train_shapes_vq.log",
    benchmark:
        f"{LOGS}/train_shapes_vq.benchmark.tsv"
    priority: LONGEST_CHAIN_PRIORITY
    conda:
        MAIN_ENV
    threads: 2
    params:
        code=code_hash("train-vq"),
        precision=config["precision"],
        checkpoint=f"{R}/checkpoints/vq.pt",
        size=config["shapes"]["image_size"],
        steps=config["shapes_models"]["vq"]["steps"],
        batch_size=config["shapes_models"]["vq"]["batch_size"],
        lr=config["shapes_models"]["vq"]["lr"],
        codebook_size=config["shapes_models"]["vq"]["codebook_size"],
        object_weight=config["shapes_models"]["vq"]["object_weight"],
        min_psnr=config["shapes_models"]["vq"]["min_heldout_psnr"],
        min_recall=config["shapes_models"]["vq"]["min_detector_recall"],
        min_color=config["shapes_models"]["vq"]["min_color_accuracy"],
        seed=config["seed"],
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli train-vq --images {input.images:q} --heldout {input.heldout:q} --out {output:q}"
        " --checkpoint {params.checkpoint:q} --image-size {params.size} --steps {params.steps}"
        " --batch-size {params.batch_size} --lr {params.lr} --codebook-size {params.codebook_size}"
        " --object-weight {params.object_weight} --min-heldout-psnr {params.min_psnr} --min-detector-recall {params.min_recall}"
        " --min-color-accuracy {params.min_color} --seed {params.seed} --precision {params.precision} > {log:q} 2>&1"


rule tokenize_split:
    """VQ tokens of the training / fine-tuning images, encoded once for the LM, Show-o, FAiD and RA-CM3 jobs."""
    input:
        images=FINETUNE_IMAGES,
        vq=TOKENIZER,
    output:
        SPLIT_TOKENS,
    log:
        f"{LOGS}/tokenize_split.log",
    benchmark:
        f"{LOGS}/tokenize_split.benchmark.tsv"
    priority: LONGEST_CHAIN_PRIORITY
    conda:
        MAIN_ENV
    threads: 2
    resources:
        gpu=0 if SHAPES else 1,
    params:
        code=code_hash("tokenize"),
        device=config["device"],
        revision=config["backbone"]["revision"] or "",
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli tokenize --images {input.images:q} --vq {input.vq:q}"
        " --revision={params.revision:q} --device {params.device} --out {output:q} > {log:q} 2>&1"


rule train_shapes_lm:
    """A tiny JanusForConditionalGeneration trained on the train split's captions and VQ tokens."""
    input:
        images=f"{R}/shapes/train",
        vq=f"{R}/models/vq",
        tokens=SPLIT_TOKENS,
    output:
        directory(f"{R}/models/backbone"),
    log:
        f"{LOGS}/train_shapes_lm.log",
    benchmark:
        f"{LOGS}/train_shapes_lm.benchmark.tsv"
    priority: LONGEST_CHAIN_PRIORITY
    conda:
        MAIN_ENV
    threads: 2
    params:
        code=code_hash("train-lm"),
        precision=config["precision"],
        checkpoint=f"{R}/checkpoints/lm.pt",
        steps=config["shapes_models"]["lm"]["steps"],
        batch_size=config["shapes_models"]["lm"]["batch_size"],
        lr=config["shapes_models"]["lm"]["lr"],
        hidden=config["shapes_models"]["lm"]["hidden_size"],
        layers=config["shapes_models"]["lm"]["num_layers"],
        heads=config["shapes_models"]["lm"]["num_heads"],
        ffn=config["shapes_models"]["lm"]["intermediate_size"],
        dropout=config["shapes_models"]["lm"]["caption_dropout"],
        seed=config["seed"],
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli train-lm --images {input.images:q} --tokens {input.tokens:q}"
        " --vq {input.vq:q} --out {output:q}"
        " --checkpoint {params.checkpoint:q} --steps {params.steps} --batch-size {params.batch_size} --lr {params.lr}"
        " --hidden-size {params.hidden} --num-layers {params.layers} --num-heads {params.heads}"
        " --intermediate-size {params.ffn} --caption-dropout {params.dropout} --seed {params.seed} --precision {params.precision} > {log:q} 2>&1"


rule train_shapes_clip:
    """A small open_clip model trained contrastively on Shapes image-caption pairs (scenes and object crops);
    metrics.json holds its zero-shot colour and shape accuracy on held-out renders."""
    input:
        images=f"{R}/shapes/database",
        heldout=f"{R}/shapes/heldout",
    output:
        directory(SHAPES_CLIP),
    log:
        f"{LOGS}/train_shapes_clip.log",
    benchmark:
        f"{LOGS}/train_shapes_clip.benchmark.tsv"
    priority: CHAIN_PRIORITY
    conda:
        MAIN_ENV
    threads: 2
    params:
        code=code_hash("train-clip"),
        precision=config["precision"],
        checkpoint=f"{R}/checkpoints/clip.pt",
        size=config["shapes"]["image_size"],
        steps=config["shapes_models"]["clip"]["steps"],
        batch_size=config["shapes_models"]["clip"]["batch_size"],
        lr=config["shapes_models"]["clip"]["lr"],
        seed=config["seed"],
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli train-clip --images {input.images:q} --heldout {input.heldout:q}"
        " --out {output:q} --checkpoint {params.checkpoint:q} --image-size {params.size} --steps {params.steps}"
        " --batch-size {params.batch_size} --lr {params.lr} --seed {params.seed} --precision {params.precision} > {log:q} 2>&1"
