"""Train the Shapes-world masked-decoding backbone: a tiny Show-o (`arrag.models.showo`) over the trained Shapes VQ.

Objective (Show-o's text-to-image loss, a MaskGIT-style discrete diffusion). For each training image with
tokens x [N] (codebook ids from the frozen VQ, raster order):

    r ~ U(0, 1)                                   one random time per image
    n = max(1, round(N * schedule(r)))            schedule: cosine, cos(r * pi / 2)
    M = n positions drawn uniformly without replacement
    input = x with the positions in M replaced by the mask token
    loss = cross-entropy over the codebook at the positions in M only, averaged over all masked positions of
           the batch (not per image)

with caption dropout: a dropped caption becomes the empty string, whose prompt <|t2i|> <bos> <eos> is the
unconditional prompt that classifier-free guidance uses at generation time. The forward pass is
`arrag.models.showo.forward_teacher_forced`, the same model code that `generate_tokens` runs at every decoding step.

Facts taken from the official code (github.com/showlab/Show-o at 45a5a2d, read for facts, not copied):
- training/utils.py `mask_or_random_replace_tokens`, lines 85-88: ``timesteps = torch.rand(batch_size)``,
  ``mask_prob = mask_schedule(timesteps)`` clipped below at ``min_masking_rate`` (0.0 in
  configs/showo_pretraining_stage1.yaml: no effect); line 91: ``num_token_masked = (seq_len *
  mask_prob).round().clamp(min=1)``; lines 101-102: the masked positions are a uniform random subset of that
  size (``rand(...).argsort(-1) < num_token_masked``); line 134: ``input_ids = torch.where(mask, mask_id,
  image_tokens)`` (noise_type "mask"); line 151: ``labels = torch.where(mask, image_tokens, -100)``.
- training/train.py line 244: the schedule is ``config.training.mask_schedule``, default "cosine"
  (models/sampling.py `cosine_schedule`: cos(t * pi / 2)); line 476: image ids are codes + len(text tokenizer).
- models/modeling_showo.py lines 83-85: ``loss_t2i = F.cross_entropy(logits[:B, max_seq_length + 1:],
  labels[:B, max_seq_length + 1:], ignore_index=-100)``: a mean over every labelled position of the batch,
  with no shift (the logits at a position predict that position's token).
- training/prompting_utils.py lines 45 and 55-57: caption dropout with probability ``cond_dropout_prob`` (0.1 in
  the stage-1 config) replaces the text by ``<|t2i|> <bos> <eos>``, the prompt of the empty caption.
Differences, on purpose: the official softmax runs over the whole vocabulary (``output_size = vocab_size``) and
its labels also keep <|soi|> and <|eoi|> (each labelled with itself); here the softmax runs over the codebook
only, the ids `generate_tokens` can sample, and only image positions are scored. The official model also trains
language-modelling and captioning losses, which text-to-image generation does not need.

Saved layout of `out_dir`: the backbone (`ShowoBackbone.save_pretrained`: model.safetensors, config.json,
tokenizer; loads with `arrag.models.showo.load_showo(out_dir)`), ``vq/`` a copy of the VQ it was trained with
(`JanusVQVAE.save_pretrained`; `load_shapes_vq(out_dir)` reads it, so the folder is self-contained and can be
moved), loss.csv, loss.png, metrics.json and sample_grid.png.
"""

from __future__ import annotations

import math
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
from arrag.models.janus import derive_seed
from arrag.models.showo import (
    MaskGitSampling,
    ShowoBackbone,
    build_tiny_showo,
    forward_teacher_forced,
    generate_tokens,
    mask_ratio,
)
from arrag.models.vq import decode_tokens, is_magvit2
from arrag.patchdb.encode import load_vq, vq_geometry
from arrag.precision import autocast, machine, resolve_precision
from arrag.training.finetune import finetune_pairs
from arrag.training.loop import batch_indices, optimizer_step, resume, save_training, step_generator, warmup_cosine
from evaluators.io import write_json_atomic

VQ_SUBDIR = "vq"  # out_dir/vq: the copy of the VQ the backbone was trained with


@dataclass(frozen=True)
class ShowoTrainConfig:
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_text_len: int = 32  # caption tokens incl. <bos> <eos>; Shapes captions need <= 16, DPG prompts <= 31
    steps: int = 500  # 0.30-0.36 s/step on 2 cores (native bf16, batch 32): about 3 min, + 1 min to encode 8000 images
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    mask_schedule: str = "cosine"
    checkpoint_every: int = 100
    precision: str = "auto"  # auto | fp32 | bf16 (arrag.precision); resolved before training
    seed: int = 0


def learning_rate(config: ShowoTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    return warmup_cosine(config.lr, config.warmup_steps, config.steps, step)


# ----------------------------------------------------------------------------------------------------------
# The masked-token objective


def masked_counts(num_tokens: int, times: torch.Tensor, schedule: str) -> torch.Tensor:
    """How many of N tokens to mask for times r [B] in [0, 1): max(1, round(N * schedule(r))) -> [B] long."""
    return (num_tokens * mask_ratio(schedule, times)).round().clamp(min=1).long()


def mask_tokens(tokens: torch.Tensor, mask_id: int, times: torch.Tensor, generator: torch.Generator,
                schedule: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """Mask tokens [B, N] at times r [B]: returns (inputs [B, N] with `mask_id` at the masked positions, masked
    [B, N] bool). Each row masks `masked_counts` positions, a uniform random subset drawn from `generator`."""
    batch, num_tokens = tokens.shape
    counts = masked_counts(num_tokens, times, schedule)
    ranks = torch.rand(batch, num_tokens, generator=generator).argsort(-1)  # a random permutation per row
    masked = ranks < counts.unsqueeze(-1)
    return torch.where(masked, mask_id, tokens), masked


def masked_token_loss(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of codebook logits [B, N, C] against tokens [B, N], averaged over the masked positions
    (masked [B, N] bool) of the whole batch; other positions do not contribute."""
    return F.cross_entropy(logits.float()[masked], tokens[masked])


def training_batch(captions: list[str], tokens: torch.Tensor, mask_id: int, config: ShowoTrainConfig,
                   generator: torch.Generator) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """One step's inputs from captions [B] and tokens [B, N]: (captions with dropped ones replaced by "", masked
    grid [B, N], masked [B, N] bool). Draws, in this order: dropout [B], times r [B], position ranks [B, N]."""
    dropped = torch.rand(len(captions), generator=generator) < config.caption_dropout
    captions = ["" if drop else caption for caption, drop in zip(captions, dropped.tolist(), strict=True)]
    times = torch.rand(len(captions), generator=generator)
    grid, masked = mask_tokens(tokens, mask_id, times, generator, config.mask_schedule)
    return captions, grid, masked


# ----------------------------------------------------------------------------------------------------------
# Training


def build_backbone(captions: list[str], vq: JanusVQVAE, config: ShowoTrainConfig) -> ShowoBackbone:
    """A tiny Show-o whose word tokenizer covers `captions`, with the VQ's grid and codebook size."""
    return build_tiny_showo(
        captions, source="shapes", codebook_size=vq.config.num_embeddings, grid_size=vq.config.num_patches,
        max_text_len=config.max_text_len, hidden_size=config.hidden_size, num_layers=config.num_layers,
        num_heads=config.num_heads, intermediate_size=config.intermediate_size,
    )


def train_shapes_showo(vq_dir: str | Path, train_dir: str | Path, out_dir: str | Path, config: ShowoTrainConfig,
                       checkpoint: str | Path, heldout_dir: str | Path | None = None, sample_guidance: float = 3.0,
                       sample_steps: int = 12, tokens_file: str | Path | None = None) -> dict:
    """Train on the train split encoded by the VQ in `vq_dir` and save into `out_dir` (layout in the module
    docstring). Resumes from `checkpoint` if present; the result is the same as an uninterrupted run.
    `heldout_dir` (optional) gives the held-out masked-token CE and the sample captions; `sample_guidance` and
    `sample_steps` set the decoding of sample_grid.png; the training images' tokens come from `tokens_file`
    (`arrag tokenize`) when given, else are encoded here. Returns the metrics."""
    config = replace(config, precision=resolve_precision(config.precision))
    torch.manual_seed(config.seed)
    vq = JanusVQVAE.from_pretrained(vq_dir).eval()
    _, captions, files = finetune_pairs(train_dir)
    image_tokens = split_tokens.image_tokens(vq, files, vq_geometry(vq)[0], tokens_file)  # [M, N]
    backbone = build_backbone(captions, vq, config)
    mask_id = backbone.config.mask_token_id
    parameters = list(backbone.model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    log, start, seconds, _ = resume(checkpoint, config, backbone.model, optimizer)
    backbone.model.train()
    started = time.perf_counter() - seconds
    progress = tqdm(range(start, config.steps), desc="train Show-o", unit="step", initial=start, total=config.steps,
                    mininterval=5)
    for step in progress:
        rows = batch_indices(len(captions), config.batch_size, step, config.seed)
        targets = image_tokens[rows]
        batch_captions, grid, masked = training_batch([captions[i] for i in rows.tolist()], targets, mask_id, config,
                                                      step_generator(config.seed, step))
        with autocast(config.precision):
            logits = forward_teacher_forced(backbone, batch_captions, grid)
        loss = masked_token_loss(logits, targets, masked)
        optimizer_step(optimizer, parameters, loss, learning_rate(config, step))
        log.add(step, loss=loss.item(), lr=learning_rate(config, step))
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            save_training(checkpoint, config, backbone.model, optimizer, log, step + 1, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    backbone.model.eval()

    out_dir = Path(out_dir)
    backbone.save_pretrained(out_dir)
    vq.save_pretrained(out_dir / VQ_SUBDIR)
    log.write_csv(out_dir / "loss.csv")
    log.plot(out_dir / "loss.png", "Shapes Show-o training (masked-token CE)")
    metrics = {"steps": config.steps, "train_seconds": round(seconds, 1),
               "seconds_per_step": round(seconds / max(1, config.steps), 3),
               "final_loss_last50": float(np.mean([r["loss"] for r in log.rows[-50:]])),
               "trainable_parameters": sum(p.numel() for p in parameters), "train_images": len(captions),
               "train_masked_ce": evaluate_masked_ce(backbone, captions[:256], image_tokens[:256], config)}
    sample_captions = captions[:16]
    if heldout_dir is not None:
        _, heldout, heldout_files = finetune_pairs(heldout_dir)
        heldout, heldout_files = heldout[:256], heldout_files[:256]
        heldout_tokens = split_tokens.image_tokens(vq, heldout_files, vq_geometry(vq)[0])
        metrics["heldout_masked_ce"] = evaluate_masked_ce(backbone, heldout, heldout_tokens, config)
        metrics["heldout_masked_ce_unconditional"] = evaluate_masked_ce(
            backbone, [""] * len(heldout), heldout_tokens, config)
        sample_captions = heldout[:16]
    sampling = MaskGitSampling(guidance_scale=sample_guidance, steps=sample_steps)
    save_sample_grid(backbone, vq, sample_captions, out_dir / "sample_grid.png", config.seed, sampling)
    metrics["sampling"] = asdict(sampling)
    metrics.update(config=asdict(config), precision=config.precision, machine=machine())
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


def load_shapes_vq(backbone_dir: str | Path) -> JanusVQVAE:
    """The VQ saved beside a trained Shapes Show-o (out_dir/vq), in eval mode."""
    return JanusVQVAE.from_pretrained(Path(backbone_dir) / VQ_SUBDIR).eval()


def load_showo_tokenizer(backbone_dir: str | Path, grid: int, tokenizer: str | None = None,
                         revision: str | None = None) -> torch.nn.Module:
    """Show-o's image tokenizer: `tokenizer` when given (a hub id or folder of MAGVIT-v2, `showlab/magvitv2`, or
    any `load_vq` source), else the VQ saved beside a Shapes Show-o. A MAGVIT-v2 is set to the backbone's `grid`
    (image side = grid x its downsampling: Show-o 512 reads 512-pixel images as 32 x 32 tokens)."""
    if tokenizer is None:
        return load_shapes_vq(backbone_dir)
    vq = load_vq(tokenizer, revision)
    if is_magvit2(vq):
        vq.config.image_size = grid * vq.config.downsample
    elif vq_geometry(vq)[1] != grid:
        raise ValueError(f"tokenizer {tokenizer!r} makes {vq_geometry(vq)[1]}-token grids, the backbone {grid}")
    return vq


# ----------------------------------------------------------------------------------------------------------
# Evaluation and samples


@torch.no_grad()
def evaluate_masked_ce(backbone: ShowoBackbone, captions: list[str], tokens: torch.Tensor, config: ShowoTrainConfig,
                       batch_size: int = 64) -> float:
    """The training loss without caption dropout on captions [M] and tokens [M, N], with fixed masks (times and
    positions drawn from a generator seeded by `config.seed`): the mean masked-token CE over all masked positions.
    """
    generator = torch.Generator().manual_seed(config.seed)
    mask_id = backbone.config.mask_token_id
    total, count = 0.0, 0
    for start in range(0, len(captions), batch_size):
        targets = tokens[start:start + batch_size]
        times = torch.rand(len(targets), generator=generator)
        grid, masked = mask_tokens(targets, mask_id, times, generator, config.mask_schedule)
        with autocast(resolve_precision(config.precision)):
            logits = forward_teacher_forced(backbone, captions[start:start + batch_size], grid)
        total += masked_token_loss(logits, targets, masked).item() * int(masked.sum())
        count += int(masked.sum())
    return total / max(1, count)


@torch.no_grad()
def save_sample_grid(backbone: ShowoBackbone, vq: JanusVQVAE, captions: list[str], path: Path, seed: int,
                     sampling: MaskGitSampling, columns: int = 8) -> None:
    """One generated image per caption, tiles in rows of `columns`, 2x upscaled (black where a row is short)."""
    seeds = [derive_seed(seed, i, 0) for i in range(len(captions))]
    tokens = generate_tokens(backbone, captions, seeds, sampling)  # [B, N]
    side = backbone.grid_size
    images = decode_tokens(vq, tokens.view(-1, side, side))
    tiles = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # [B, H, W, 3]
    rows = math.ceil(len(tiles) / columns)
    tiles = torch.cat([tiles, tiles.new_zeros(rows * columns - len(tiles), *tiles.shape[1:])])
    grid = tiles.view(rows, columns, *tiles.shape[1:]).permute(0, 2, 1, 3, 4).flatten(0, 1).flatten(1, 2)
    image = Image.fromarray(grid.contiguous().numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * 2, image.height * 2), Image.NEAREST).save(path)
