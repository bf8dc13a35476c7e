"""Train the Shapes-world backbone: a tiny `JanusForConditionalGeneration` over the trained Shapes VQ.

Teacher forcing on the image tokens of the train split given their captions (cross-entropy over the
codebook), with caption dropout: a dropped caption becomes the unconditional prompt that classifier-free
guidance uses at generation time (every token but BOS and BOI replaced by pad, as transformers' `generate`
builds it). The VQ is frozen; the language model, the generation embedding / aligner and the generation head
train. The result is saved with `save_pretrained` (safetensors + processor) and loads with
`arrag.models.janus.load_backbone`, like the hub checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm
from transformers import JanusVQVAE

from arrag import split_tokens
from arrag.models.janus import (
    JanusBackbone,
    SamplingConfig,
    build_tiny_backbone,
    derive_seed,
    forward_teacher_forced,
    generate_tokens,
    tokenize_prompts,
    unconditional_ids,
)
from arrag.models.vq import decode_tokens
from arrag.patchdb.encode import vq_geometry
from arrag.precision import autocast, machine, resolve_precision
from arrag.training.finetune import finetune_pairs
from arrag.training.loop import batch_indices, optimizer_step, resume, save_training, step_generator, warmup_cosine
from evaluators.io import write_json_atomic


@dataclass(frozen=True)
class LMTrainConfig:
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    steps: int = 1200
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    checkpoint_every: int = 100
    precision: str = "auto"  # auto | fp32 | bf16 (arrag.precision); resolved before training
    seed: int = 0


def learning_rate(config: LMTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    return warmup_cosine(config.lr, config.warmup_steps, config.steps, step)


def build_backbone(captions: list[str], vq: JanusVQVAE, config: LMTrainConfig) -> JanusBackbone:
    """A tiny backbone whose tokenizer covers `captions` and whose VQ is the trained one (frozen)."""
    vq_config = vq.config
    patch = 2 ** (len(vq_config.channel_multiplier) - 1)
    backbone = build_tiny_backbone(
        captions, source="shapes", image_size=vq_config.num_patches * patch, patch_size=patch,
        codebook_size=vq_config.num_embeddings, hidden_size=config.hidden_size, num_layers=config.num_layers,
        num_heads=config.num_heads, intermediate_size=config.intermediate_size,
        vq_base_channels=vq_config.base_channels, vq_latent_channels=vq_config.latent_channels,
        vq_embed_dim=vq_config.embed_dim, vq_channel_multiplier=tuple(vq_config.channel_multiplier),
        vq_num_res_blocks=vq_config.num_res_blocks,
    )
    backbone.vq.load_state_dict(vq.state_dict())
    return backbone


def trainable_parameters(backbone: JanusBackbone) -> list[torch.nn.Parameter]:
    """The language model and the generation embedding, aligner and head (not the VQ or the
    understanding encoder, which image generation does not use)."""
    inner = backbone.model.model
    modules = [inner.language_model, inner.generation_embeddings, inner.generation_aligner, inner.generation_head]
    for parameter in backbone.model.parameters():
        parameter.requires_grad_(False)
    parameters = [p for module in modules for p in module.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


def train_lm(train_dir: str | Path, vq_dir: str | Path, out_dir: str | Path, checkpoint: str | Path,
             config: LMTrainConfig, tokens_file: str | Path | None = None) -> dict:
    """Train and save the backbone into `out_dir` (with loss.csv, loss.png, metrics.json, samples.png).
    The images' tokens come from `tokens_file` (`arrag tokenize`) when given, else are encoded here.
    Resumes from `checkpoint` if present; the result is the same as an uninterrupted run."""
    config = replace(config, precision=resolve_precision(config.precision))
    torch.manual_seed(config.seed)
    vq = JanusVQVAE.from_pretrained(vq_dir).eval()
    _, captions, files = finetune_pairs(train_dir)
    image_tokens = split_tokens.image_tokens(vq, files, vq_geometry(vq)[0], tokens_file)
    backbone = build_backbone(captions, vq, config)
    input_ids, attention_mask = tokenize_prompts(backbone, captions)
    parameters = trainable_parameters(backbone)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    log, start, seconds, _ = resume(checkpoint, config, backbone.model, optimizer)
    backbone.model.train()
    started = time.perf_counter() - seconds
    progress = tqdm(range(start, config.steps), desc="train LM", unit="step", initial=start, total=config.steps,
                    mininterval=5)
    for step in progress:
        rows = batch_indices(len(captions), config.batch_size, step, config.seed)
        ids, mask, targets = input_ids[rows], attention_mask[rows], image_tokens[rows]
        dropped = torch.rand(len(rows), generator=step_generator(config.seed, step)) < config.caption_dropout
        ids = torch.where(dropped[:, None], unconditional_ids(backbone, ids), ids)
        with autocast(config.precision):
            logits = forward_teacher_forced(backbone, ids, targets, mask)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer_step(optimizer, parameters, loss, learning_rate(config, step))
        log.add(step, loss=loss.item(), lr=learning_rate(config, step))
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            save_training(checkpoint, config, backbone.model, optimizer, log, step + 1, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    backbone.model.eval()
    out_dir = Path(out_dir)
    backbone.save_pretrained(out_dir)
    log.write_csv(out_dir / "loss.csv")
    log.plot(out_dir / "loss.png", "Shapes backbone training")
    save_samples(backbone, captions[:16], out_dir / "samples.png", config.seed)
    metrics = {"steps": config.steps, "train_seconds": round(seconds, 1),
               "final_loss_last50": float(np.mean([r["loss"] for r in log.rows[-50:]])),
               "trainable_parameters": sum(p.numel() for p in parameters), "train_images": len(captions),
               "config": asdict(config),
               "precision": config.precision, "machine": machine()}
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


@torch.no_grad()
def save_samples(backbone: JanusBackbone, captions: list[str], path: Path, seed: int) -> None:
    """One generated image per caption (CFG 3), in a row of 64 px tiles, 2x upscaled."""
    seeds = [derive_seed(seed, i, 0) for i in range(len(captions))]
    tokens = generate_tokens(backbone, captions, seeds, SamplingConfig(cfg_weight=3.0))
    grid = backbone.grid_size
    images = decode_tokens(backbone.vq, tokens.view(-1, grid, grid))
    tiles = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    strip = Image.fromarray(torch.cat(list(tiles), dim=1).numpy())
    strip.resize((strip.width * 2, strip.height * 2), Image.NEAREST).save(path)
