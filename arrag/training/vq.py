"""Train the Shapes-world VQ tokenizer: a tiny `JanusVQVAE` (64x64 images -> 8x8 token grid).

`JanusVQVAE.forward` cannot train (it decodes from argmin indices, so the encoder gets no reconstruction
gradient), so the step is written here: encoder -> quant_conv -> L2-normalised z -> nearest L2-normalised
code (Janus-Pro's rule, see `arrag.models.vq`) -> straight-through -> post_quant_conv -> decoder.
Loss: L1 + L2 reconstruction, codebook term and beta x commitment term (VQ-VAE form). The reconstruction terms
weigh object pixels 1 + `object_weight` (the split's masks): objects cover about a tenth of a Shapes image, and an
unweighted loss lets the tokenizer paint them as blobs of one colour (demo sizes, 900 steps, seed 0: detector
colour accuracy on held-out reconstructions 0.20 unweighted at lr 2e-3, 0.995 with weight 9 at lr 5e-4, 0.97 with
weight 9 at lr 2e-3). Codes unused over `restart_every` steps are restarted on random latents of the current batch,
which keeps the codebook alive. Adam at `lr` decayed by a cosine to a tenth at the last step.
Architecture: 32 channels at every level and no res blocks (261K parameters). At the demo's settings it kept the
held-out quality of Janus's layout scaled down (multipliers 1, 1, 2, 2 with a res block per level, 1.15M
parameters; the spread of both is in the README) at a third of the cost of a training step and a quarter of the
encoding (AMD EPYC Zen 3, fp32: 0.25 against 0.73 s per step of 16 images at 2 threads), which is most of what
the demo spends on its tokenizer: training it, then encoding the database and the training split.
`heldout_checks` measures what later stages need: the Shapes detector on held-out reconstructions, and the PSNR
beside that of a background-only fill.
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
from transformers import JanusVQVAE, JanusVQVAEConfig

from arrag.models.vq import codebook_vectors, decode_tokens, encode_images, encode_latents, nearest_codes
from arrag.precision import autocast, machine, resolve_precision
from arrag.shapes.dataset import read_annotations, save_png
from arrag.shapes.vocab import vocabulary
from arrag.training.loop import batch_indices, resume, save_training, step_generator, warmup_cosine
from evaluators.io import write_json_atomic
from evaluators.shapes_detector import ShapesDetector, validate_detector, vocabulary_from_dict


@dataclass(frozen=True)
class VQTrainConfig:
    image_size: int = 64
    grid: int = 8  # token grid side: image_size / 2 ** (len(channel_multiplier) - 1)
    codebook_size: int = 512
    embed_dim: int = 8
    base_channels: int = 32
    channel_multiplier: tuple[int, ...] = (1, 1, 1, 1)
    num_res_blocks: int = 0  # with constant multipliers (JanusVQVAE needs a res block where channels change)
    latent_channels: int = 64
    steps: int = 900
    batch_size: int = 16
    lr: float = 5e-4
    object_weight: float = 9.0  # reconstruction loss weight 1 + object_weight on object pixels (split masks)
    beta: float = 0.25
    restart_every: int = 100
    checkpoint_every: int = 100
    precision: str = "auto"  # auto | fp32 | bf16 (arrag.precision); resolved before training
    seed: int = 0


def vq_config(config: VQTrainConfig) -> JanusVQVAEConfig:
    levels = len(config.channel_multiplier) - 1
    if config.image_size // 2**levels != config.grid:
        raise ValueError(f"image_size {config.image_size} with {levels} downsamplings gives a "
                         f"{config.image_size // 2**levels} grid, not {config.grid}: change channel_multiplier")
    if any(config.base_channels * m % 32 for m in config.channel_multiplier):
        raise ValueError("every base_channels x channel_multiplier must be a multiple of 32 (GroupNorm(32))")
    if config.num_res_blocks == 0 and len(set(config.channel_multiplier)) > 1:
        raise ValueError("num_res_blocks 0 needs one channel_multiplier for every level (JanusVQVAE changes the width "
                         "inside a res block)")
    return JanusVQVAEConfig(
        embed_dim=config.embed_dim, num_embeddings=config.codebook_size, latent_channels=config.latent_channels,
        base_channels=config.base_channels, channel_multiplier=list(config.channel_multiplier),
        num_res_blocks=config.num_res_blocks, num_patches=config.grid,
    )


def read_images(split_dir: str | Path, limit: int | None = None) -> torch.Tensor:
    """The images of a split folder (images/*.png, sorted) as uint8 [N, H, W, 3]."""
    files = sorted((Path(split_dir) / "images").glob("*.png"))[:limit]
    if not files:
        raise FileNotFoundError(f"no images in {Path(split_dir) / 'images'}")
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))


def read_object_masks(split_dir: str | Path, limit: int | None = None) -> torch.Tensor:
    """Where a split's objects are (masks/*.png > 0, the images' order) as bool [N, H, W]."""
    files = sorted((Path(split_dir) / "masks").glob("*.png"))[:limit]
    if not files:
        raise FileNotFoundError(f"no masks in {Path(split_dir) / 'masks'} (object_weight needs the split's masks)")
    return torch.from_numpy(np.stack([np.asarray(Image.open(f)) > 0 for f in files]))


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return (images.permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous()


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2), averaged over images."""
    mse = (reference - estimate).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(4.0 / mse)).mean())


@torch.no_grad()
def reconstruction_psnr(vq: JanusVQVAE, images: torch.Tensor, batch_size: int = 64) -> float:
    """PSNR of decode(encode(x)) over uint8 images [N, H, W, 3]."""
    vq.eval()
    values = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start:start + batch_size])
        values.append(psnr(x, decode_tokens(vq, encode_images(vq, x))) * len(x))
    return sum(values) / len(images)


def train_step(vq: JanusVQVAE, x: torch.Tensor, beta: float, precision: str, weights: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """One forward pass (`precision` resolved: fp32 | bf16) of images x [B, 3, H, W]; `weights` [B, H, W] weigh
    the reconstruction error per pixel (a weighted mean). Returns (loss, logged values, token indices [B, h, w])."""
    with autocast(precision):
        z = encode_latents(vq, x, l2_normalized=True).float()  # [B, h, w, d]
    codebook = codebook_vectors(vq, normalized=True)
    indices = nearest_codes(z.detach(), codebook.detach())
    z_q = codebook[indices]
    codebook_loss = F.mse_loss(z_q, z.detach())
    commitment = F.mse_loss(z, z_q.detach())
    z_st = (z + (z_q - z).detach()).permute(0, 3, 1, 2).contiguous()
    with autocast(precision):
        reconstruction = vq.decoder(vq.post_quant_conv(z_st)).float()
    if weights is None:
        l1, l2 = F.l1_loss(reconstruction, x), F.mse_loss(reconstruction, x)
    else:
        w = weights.unsqueeze(1) / weights.mean()
        l1, l2 = (w * (reconstruction - x).abs()).mean(), (w * (reconstruction - x).pow(2)).mean()
    loss = l1 + l2 + codebook_loss + beta * commitment
    logged = {"loss": loss.item(), "l1": l1.item(), "codebook": codebook_loss.item(),
              "psnr": psnr(x, reconstruction.detach().clamp(-1, 1))}
    return loss, logged, indices


@torch.no_grad()
def restart_dead_codes(vq: JanusVQVAE, usage: torch.Tensor, latents: torch.Tensor, generator: torch.Generator) -> int:
    """Re-initialise codes with zero usage to random latents [M, d] of the batch; returns how many."""
    dead = torch.nonzero(usage == 0).flatten()
    if len(dead):
        picks = torch.randint(len(latents), (len(dead),), generator=generator)
        vq.quantize.embedding.weight[dead] = latents[picks].to(vq.quantize.embedding.weight.dtype)
    return len(dead)


def train_vq(images_dir: str | Path, out_dir: str | Path, checkpoint: str | Path, config: VQTrainConfig,
             heldout_dir: str | Path | None = None) -> dict:
    """Train, save with `save_pretrained` (safetensors) into `out_dir` with loss.csv / loss.png /
    metrics.json / reconstructions.png, and return the metrics. Resumes from `checkpoint` if present (written with
    the same config, the precision resolved)."""
    config = replace(config, precision=resolve_precision(config.precision))
    torch.manual_seed(config.seed)
    vq = JanusVQVAE(vq_config(config))
    optimizer = torch.optim.Adam(vq.parameters(), lr=config.lr, betas=(0.5, 0.9))
    images = read_images(images_dir)
    objects = read_object_masks(images_dir) if config.object_weight else None
    usage = torch.zeros(config.codebook_size, dtype=torch.long)
    log, start, seconds, state = resume(checkpoint, config, vq, optimizer)
    usage = state.get("usage", usage)
    vq.train()
    started = time.perf_counter() - seconds
    progress = tqdm(range(start, config.steps), desc="train VQ", unit="step", initial=start, total=config.steps,
                    mininterval=5)
    for step in progress:
        rows = batch_indices(len(images), config.batch_size, step, config.seed)
        x = to_model_input(images[rows])
        weights = None if objects is None else 1.0 + config.object_weight * objects[rows].float()
        loss, logged, indices = train_step(vq, x, config.beta, config.precision, weights)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(config.lr, 0, config.steps, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        usage += torch.bincount(indices.flatten(), minlength=config.codebook_size)
        if (step + 1) % config.restart_every == 0:
            with torch.no_grad():
                latents = encode_latents(vq, x, l2_normalized=True).reshape(-1, config.embed_dim)
            logged["restarted"] = restart_dead_codes(vq, usage, latents, step_generator(config.seed, step))
            usage.zero_()
        log.add(step, **{k: v for k, v in logged.items() if k != "restarted"})
        progress.set_postfix(loss=f"{logged['loss']:.3f}", psnr=f"{logged['psnr']:.1f}", refresh=False)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            save_training(checkpoint, config, vq, optimizer, log, step + 1, time.perf_counter() - started,
                          usage=usage)
    seconds = time.perf_counter() - started
    vq.eval()
    out_dir = Path(out_dir)
    vq.save_pretrained(out_dir)
    log.write_csv(out_dir / "loss.csv")
    log.plot(out_dir / "loss.png", "Shapes VQ training")
    metrics = {"steps": config.steps, "train_seconds": round(seconds, 1), "final_loss": log.rows[-1]["loss"],
               "train_psnr_last100": float(np.mean([r["psnr"] for r in log.rows[-100:]])), "config": asdict(config),
               "precision": config.precision, "machine": machine()}
    if heldout_dir is not None:
        metrics.update(heldout_checks(vq, heldout_dir, limit=500))
        save_reconstructions(vq, read_images(heldout_dir, limit=16), out_dir / "reconstructions.png")
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


@torch.no_grad()
def reconstruct(vq: JanusVQVAE, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """decode(encode(x)) of uint8 images [N, H, W, 3] as uint8 [N, H, W, 3]."""
    vq.eval()
    out = []
    for start in range(0, len(images), batch_size):
        rebuilt = decode_tokens(vq, encode_images(vq, to_model_input(images[start:start + batch_size])))
        out.append(((rebuilt.float().permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


@torch.no_grad()
def heldout_checks(vq: JanusVQVAE, split_dir: str | Path, limit: int = 500) -> dict:
    """What later stages need of the tokenizer, on the first `limit` images of a held-out split:
    - `heldout_psnr` of the reconstructions, beside `background_psnr`, the PSNR of painting each image with its
      background colour (objects cover about a tenth of the pixels, so PSNR alone says little);
    - `heldout_detector`: the Shapes detector on the reconstructions against the annotations (recall, precision,
      colour accuracy of the matched objects, background accuracy), as `checks/detector_vq.json` computes it."""
    files = sorted((Path(split_dir) / "images").glob("*.png"))[:limit]
    ids = [f.stem for f in files]
    images = read_images(split_dir, limit)
    records = {r["id"]: r for r in read_annotations(split_dir)}
    backgrounds = vocabulary()["backgrounds"]
    filled = torch.stack([torch.tensor(backgrounds[records[i]["background"]], dtype=torch.uint8).expand_as(x)
                          for i, x in zip(ids, images, strict=True)])
    detector = ShapesDetector(vocabulary_from_dict(vocabulary()))
    rebuilt = reconstruct(vq, images)
    report = validate_detector(split_dir, detector, pixels=dict(zip(ids, rebuilt.numpy(), strict=True)))
    return {"heldout_images": len(images), "heldout_psnr": reconstruction_psnr(vq, images),
            "background_psnr": psnr(to_model_input(images), to_model_input(filled)),
            "codes_used_heldout": int(encode_images(vq, to_model_input(images)).unique().numel()),
            "heldout_detector": {k: report[k] for k in ("recall", "precision", "color_accuracy",
                                                        "background_accuracy", "n_objects")}}


@torch.no_grad()
def save_reconstructions(vq: JanusVQVAE, images: torch.Tensor, path: Path) -> None:
    """Originals (top row) above their reconstructions (bottom row), 2x upscaled."""
    x = to_model_input(images)
    rebuilt = decode_tokens(vq, encode_images(vq, x))
    rows = [((t.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) for t in (x, rebuilt)]
    grid = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0).numpy()
    image = Image.fromarray(grid)
    image.resize((image.width * 2, image.height * 2), Image.NEAREST).save(path)


@torch.no_grad()
def reconstruct_split(vq_dir: str | Path, split_dir: str | Path, out_dir: str | Path, limit: int | None = None,
                      batch_size: int = 64) -> int:
    """Write decode(encode(x)) of a split's images as `<out_dir>/<id>.png` (ids of annotations.jsonl order)
    and return how many; evaluators validate on them what generated images look like."""
    vq = JanusVQVAE.from_pretrained(vq_dir).eval()
    ids = [record["id"] for record in read_annotations(split_dir)][:limit]
    out_dir = Path(out_dir)
    for start in tqdm(range(0, len(ids), batch_size), desc="VQ reconstructions", mininterval=2):
        chunk = ids[start:start + batch_size]
        files = [Path(split_dir) / "images" / f"{image_id}.png" for image_id in chunk]
        images = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
        rebuilt = decode_tokens(vq, encode_images(vq, to_model_input(images)))
        pixels = ((rebuilt.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        for image_id, array in zip(chunk, pixels, strict=True):
            save_png(Image.fromarray(array), out_dir / f"{image_id}.png")
    return len(ids)
