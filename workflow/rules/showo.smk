# Show-o-style masked decoding (Table 3's Show-o rows, Appendix B.2), Shapes scale: a masked-decoding backbone of
# Show-o's classes trained on the Shapes VQ's tokens, an O-neighbourhood index redefined from the main index's
# shards (same tokenizer), and FAiD fine-tuned on Show-o's noising. Generation and metrics go through the shared
# `generate` / `image_metric` rules (methods showo, showo_daid, showo_faid; MJHQ-style benchmark only).
SHOWO = config["showo"]

if SHOWO["methods"] and not SHAPES:
    raise WorkflowError("showo.methods: Show-o rows are wired at Shapes scale only so far (the paper-scale index "
                        "needs MAGVIT-v2 tokens of the database); set showo.methods: [] in the paper config")


rule train_shapes_showo:
    """A Show-o transformer (Phi, omni-attention, MaskGIT) over the Shapes VQ's tokens, with Show-o's masked-token
    objective; its folder holds a copy of the VQ."""
    input:
        images=f"{R}/shapes/train",
        heldout=f"{R}/shapes/heldout",
        vq=f"{R}/models/vq",
        tokens=SPLIT_TOKENS,
    output:
        directory(SHOWO_MODEL),
    params:
        checkpoint=f"{R}/checkpoints/showo.pt",
        train=finetune_arguments(SHOWO["train"]),
        guidance=SHOWO["sampling"]["guidance_scale"],
        steps=SHOWO["sampling"]["steps"],
        seed=config["seed"],
    threads: 2
    priority: CHAIN_PRIORITY
    conda:
        MAIN_ENV
    log:
        f"{LOGS}/train_shapes_showo.log",
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli train-showo --images {input.images:q} --heldout {input.heldout:q}"
        " --vq {input.vq:q} --tokens {input.tokens:q} --out {output:q} --checkpoint {params.checkpoint:q} {params.train:q}"
        " --guidance-scale {params.guidance} --maskgit-steps {params.steps} --seed {params.seed} > {log:q} 2>&1"


rule showo_index:
    """The O-neighbourhood index of masked decoding, with keys redefined from the main index's token shards."""
    input:
        expand(f"{R}/index/shards/{{shard}}.npz", shard=INDEX_SHARDS),
    output:
        index=SHOWO_INDEX,
        sidecars=SHOWO_INDEX_SIDECARS,
    params:
        hops=SHOWO["index"]["hops"],
        edge=SHOWO["index"]["edge_policy"],
        nprobe=config["index"]["nprobe"],
        seed=config["seed"],
    threads: 1
    priority: CHAIN_PRIORITY
    conda:
        MAIN_ENV
    log:
        f"{LOGS}/showo_index.log",
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli build-index --type tokens --neighbourhood O --hops {params.hops}"
        " --edge-policy {params.edge} --nprobe {params.nprobe} --seed {params.seed} --out {output.index:q} {input:q}"
        " > {log:q} 2>&1"


rule finetune_showo_faid:
    """FAiD blenders (and LoRA) on the Show-o backbone: one noising draw per training image, retrievals of its
    masked positions, Show-o's masked-token loss."""
    input:
        backbone=SHOWO_MODEL,
        images=FINETUNE_IMAGES,
        index=SHOWO_INDEX,
        sidecars=SHOWO_INDEX_SIDECARS,
        tokens=SPLIT_TOKENS,
    output:
        directory(f"{R}/models/showo_faid"),
    params:
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
    threads: 2
    priority: CHAIN_PRIORITY
    conda:
        MAIN_ENV
    log:
        f"{LOGS}/finetune_showo_faid.log",
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli finetune-showo-faid --backbone {input.backbone:q}"
        " --images {input.images:q} --tokens {input.tokens:q} --index {input.index:q} --hops {params.hops} --num-blenders {params.m}"
        " --k {params.k} --max-images {params.images} --noise-draws {params.draws} --caption-dropout {params.dropout} --out {output:q}"
        " --checkpoint {params.checkpoint:q} --device {params.device} {params.tuning:q} --seed {params.seed}"
        " > {log:q} 2>&1"
