"""FAiD training data, fine-tuning and loading (paper §3.3, Appendix B.3; official `train_FAiD.py`).

1. `precompute_retrievals` (one shard of the fine-tuning images, a Snakemake scatter): each image's VQ tokens
   and, for every position, the top-k patches retrieved with the teacher-forcing queries of the patch index
   (`PatchIndex.grid_queries`: the generated-so-far neighbourhood, exactly what generation will query, salted with
   the position as generation salts with the step, so that both draw the same patches among ties). The
   fine-tuning split is held out of the database, so no image retrieves its own patches. Positions the
   index's edge policy leaves without a key get -1 (a zero patch, as the official code).
2. `finetune_faid`: the shared loop (`arrag.training.finetune`) with the blenders as extra modules: backbone
   frozen, optional LoRA on the language model, blenders and generation head trainable, teacher forcing on
   the image tokens given the caption and every position's retrievals. A `caption_dropout` fraction of rows
   gets the unconditional prompt *without* blending, which is what the unconditional CFG branch sees at
   generation time (the official script has no caption dropout: set 0 to reproduce it).
3. `load_faid`: weights onto a fresh backbone (LoRA merged), blenders in eval mode with the fast-path caches.

Output folder: the fine-tuning outputs (adapter.safetensors with the blenders under ``extra.faid.``,
finetune.json, loss.csv, loss.png), faid.json (settings, retrieval provenance) and metrics.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from arrag.daid import load_index_for
from arrag.faid.augment import FAiD, FAiDSettings
from arrag.models.janus import JanusBackbone, forward_teacher_forced, load_backbone, tokenize_prompts, unconditional_ids
from arrag.patchdb.encode import save_npz_atomic
from arrag.patchdb.fingerprint import read_metadata
from arrag.patchdb.index import metadata_path
from arrag.training.finetune import (
    ADAPTER_FILE,
    FinetuneConfig,
    distributed_rank,
    finetune,
    finetune_pairs,
    load_finetuned,
    vq_tokens,
)
from evaluators.io import sha256_file, write_json_atomic

SETTINGS_FILE = "faid.json"


# ---------------------------------------------------------------------------------------------- retrievals
def precompute_retrievals(index_path: str | Path, backbone_source: str, train_dir: str | Path, k: int, shard: int,
                          shards: int, out: str | Path, device: str = "cpu", revision: str | None = None,
                          batch_images: int = 64, tokens_file: str | Path | None = None, max_images: int = 0) -> dict:
    """Write `out` (.npz): ids [n] (str), tokens [n, N] int32, retrieved [n, N, k] int32 (-1: none), distances
    [n, N, k] float32 for images shard, shard + shards, ... of the split's first `max_images` (0: all; their
    tokens from `tokens_file` when given, else encoded here); returns a summary."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    backbone = load_backbone(backbone_source, revision=revision, device=device)
    index = load_index_for(backbone.vq, index_path)
    records, _, files = finetune_pairs(train_dir, max_images)
    rows = list(range(shard, len(records), shards))
    grid = backbone.grid_size
    tokens = (vq_tokens(backbone, [files[r] for r in rows], tokens_file) if rows
              else torch.zeros(0, grid * grid, dtype=torch.long))
    retrieved = torch.full((len(rows), grid * grid, k), -1, dtype=torch.int32)
    distances = torch.full((len(rows), grid * grid, k), float("inf"))
    for start in tqdm(range(0, len(rows), batch_images), desc=f"retrieve shard {shard}/{shards}", mininterval=5):
        block = tokens[start:start + batch_images]
        queries, usable = index.grid_queries(block.view(-1, grid, grid))  # [b, N, Dq], [N]
        positions = torch.arange(grid * grid)[usable].repeat(len(block))  # salts as generation's steps
        found, dist = index.search(queries[:, usable].flatten(0, 1), k, salt=positions)
        retrieved[start:start + len(block), usable] = found.view(len(block), -1, k).int()
        distances[start:start + len(block), usable] = dist.view(len(block), -1, k)
    stored, _ = read_metadata(metadata_path(index_path))
    save_npz_atomic(out, ids=np.array([records[r]["id"] for r in rows]), tokens=tokens.int().numpy(),
                    retrieved=retrieved.numpy(), distances=distances.numpy(),
                    index=np.array(json.dumps({"path": str(index_path), **stored.to_dict()})))
    valid = retrieved >= 0
    return {"images": len(rows), "positions": int(valid.any(-1).sum()), "k": k,
            "mean_distance": float(distances[valid].mean()) if valid.any() else None}


def read_retrievals(paths: list[str | Path]) -> dict[str, np.ndarray]:
    """Concatenate precomputed shards -> {ids, tokens, retrieved}, rows ordered by id; refuses shards built
    against different indexes."""
    parts = [np.load(p) for p in paths]
    indexes = {str(part["index"]) for part in parts}
    if len(indexes) != 1:
        raise ValueError(f"retrieval shards {[str(p) for p in paths]} come from different indexes: rebuild them")
    ids = np.concatenate([part["ids"] for part in parts])
    order = np.argsort(ids, kind="stable")
    return {"ids": ids[order], "index": json.loads(indexes.pop()),
            **{key: np.concatenate([part[key] for part in parts])[order] for key in ("tokens", "retrieved")}}


# ---------------------------------------------------------------------------------------------- fine-tuning
def faid_loss(backbone: JanusBackbone, batch: dict[str, torch.Tensor], generator: torch.Generator, faid: FAiD,
              caption_dropout: float) -> torch.Tensor:
    """Cross-entropy of the image tokens with FAiD blending. Batch: input_ids [b, L], attention_mask [b, L],
    image_tokens [b, N], retrieved [b, N, k]. Caption-dropped rows get the unconditional prompt and no blending."""
    ids = batch["input_ids"]
    dropped = (torch.rand(len(ids), generator=generator) < caption_dropout).to(ids.device)
    ids = torch.where(dropped[:, None], unconditional_ids(backbone, ids), ids)
    targets = batch["image_tokens"].long()
    modules = faid.teacher_forced_modules(backbone, batch["retrieved"].long(), blend_rows=~dropped)
    logits = forward_teacher_forced(backbone, ids, targets, batch["attention_mask"], layer_modules=modules)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def finetune_faid(backbone_source: str, train_dir: str | Path, retrieval_files: list[str | Path], out_dir: str | Path,
                  checkpoint_dir: str | Path, settings: FAiDSettings, config: FinetuneConfig,
                  caption_dropout: float = 0.1, device: str = "cpu", revision: str | None = None,
                  max_images: int = 0) -> dict:
    """Fine-tune FAiD (hops, m of `settings`) on the split's first `max_images` (0: all) and write `out_dir` (see
    the module docstring); returns metrics."""
    backbone = load_backbone(backbone_source, revision=revision, device=device)
    records, captions, _ = finetune_pairs(train_dir, max_images)
    data = read_retrievals(retrieval_files)
    expected_ids = sorted(r["id"] for r in records)
    if list(data["ids"]) != expected_ids:
        raise ValueError(f"the retrieval shards cover {len(data['ids'])} images, the fine-tuning set has "
                         f"{len(records)} ({train_dir}, max_images {max_images}): rerun precompute-retrievals for "
                         "every shard with the same --max-images")
    if data["retrieved"].shape[-1] < settings.k:
        raise ValueError(f"retrievals hold k={data['retrieved'].shape[-1]} patches, FAiD asks k={settings.k}")
    by_id = {r["id"]: caption for r, caption in zip(records, captions, strict=True)}
    ids, mask = tokenize_prompts(backbone, [by_id[i] for i in data["ids"]])
    examples = {"input_ids": ids, "attention_mask": mask, "image_tokens": torch.from_numpy(data["tokens"]),
                "retrieved": torch.from_numpy(np.ascontiguousarray(data["retrieved"][..., :settings.k]))}
    torch.manual_seed(config.seed)  # blender initialisation
    faid = FAiD.for_backbone(backbone, settings)
    loss_fn = partial(faid_loss, faid=faid, caption_dropout=caption_dropout)
    metrics = finetune(backbone, examples, loss_fn, config, out_dir, checkpoint_dir, extra_modules={"faid": faid},
                       title=f"FAiD fine-tuning (hops {settings.hops}, m {settings.m})")
    blender_parameters = sum(p.numel() for p in faid.parameters())
    named = dict(backbone.model.named_parameters())
    metrics.update(hops=settings.hops, m=settings.m, k=settings.k, layers=faid.layers,
                   blender_parameters=blender_parameters, caption_dropout=caption_dropout,
                   lora_parameters=sum(p.numel() for n, p in named.items() if "lora_" in n),
                   backbone_parameters=sum(p.numel() for n, p in named.items() if "lora_" not in n))
    if distributed_rank()[0] == 0:  # torchrun: process 0 writes
        out_dir = Path(out_dir)
        write_json_atomic(out_dir / SETTINGS_FILE, {
            "settings": asdict(settings), "caption_dropout": caption_dropout, "layers": faid.layers,
            "retrievals": {"files": [str(p) for p in retrieval_files], "index": data["index"]}})
        write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


def variant_name(hops: str, m: int) -> str:
    """The ablation cell name of (hops, m), e.g. 'hops12_m2' (the folder name of its weights)."""
    return f"hops{hops}_m{m}"


def weights_for(variant: str, folders: list[Path], selection: str | Path | None) -> Path:
    """The weights folder of `variant` ('hops12_m2', or 'selected' with the selection record of `arrag select`)
    among `folders` (named by their cell)."""
    if variant == "selected":
        if selection is None:
            raise ValueError("variant 'selected' needs the selection record (--selection)")
        values = json.loads(Path(selection).read_text())["values"]
        variant = variant_name(str(values["hops"]), int(values["m"]))
    matches = [Path(f) for f in folders if Path(f).name == variant]
    if len(matches) != 1:
        raise ValueError(f"FAiD variant {variant}: no single weights folder of that name among "
                         f"{[str(f) for f in folders]}")
    return matches[0]


def load_faid(backbone: JanusBackbone, weights_dir: str | Path,
              blend_unconditional: bool = False) -> tuple[FAiD, dict]:
    """Apply fine-tuned FAiD weights to `backbone` -> (FAiD ready for `decode_modules`, settings for the
    generation record)."""
    weights_dir = Path(weights_dir)
    stored = json.loads((weights_dir / SETTINGS_FILE).read_text())
    settings = FAiDSettings(**{**stored["settings"], "blend_unconditional": blend_unconditional})
    faid = FAiD.for_backbone(backbone, settings)
    load_finetuned(backbone, weights_dir, extra_modules={"faid": faid})
    faid.prepare_inference(backbone)
    record = {**asdict(settings), "layers": faid.layers, "weights": str(weights_dir),
              "adapter_sha256": sha256_file(weights_dir / ADAPTER_FILE),
              "blender_parameters": sum(p.numel() for p in faid.parameters())}
    return faid, record
