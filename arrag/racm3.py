"""RA-CM3 baseline on the same backbone (Appendix B.1): image-level CLIP retrieval, the retrieved image's VQ
tokens prepended to the prompt, LoRA fine-tuning with retrieved references, generation through the same path.

Per prompt: the CLIP text embedding of the caption queries the database index (`arrag.clip`); the top-n images
(n = 1 in the paper), best first, are VQ-tokenised by the backbone's own tokenizer and their tokens, n x N of
them, become `prefix_image_tokens`: embedded like generated image tokens (generation embedding -> aligner) and
inserted after BOS, before the formatted prompt (`arrag.models.janus`, "prefix" contract). Both CFG branches see
the reference; the unconditional one drops the caption only.

Training (`finetune_racm3`): every training caption retrieves its references once (a training image never
retrieves itself: pixel-identical database images are excluded), then the shared loop
(`arrag.training.finetune`) trains LoRA + generation head by teacher forcing on the training image's tokens
given reference + caption. A `caption_dropout` fraction of rows gets the unconditional prompt with the
reference kept, which is the input of the unconditional CFG branch at generation time.

Images are VQ-tokenised at the backbone's image size after a centre square crop (bicubic resize).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from arrag.clip import ClipIndex, pixels_sha256, retrieval_accuracy
from arrag.models.janus import (
    JanusBackbone,
    forward_teacher_forced,
    load_backbone,
    tokenize_prompts,
    unconditional_ids,
)
from arrag.shapes.dataset import read_annotations
from arrag.training.finetune import (
    ADAPTER_FILE,
    FinetuneConfig,
    distributed_rank,
    finetune,
    finetune_pairs,
    load_finetuned,
    vq_tokens,
)
from evaluators.io import sha256_file, write_bytes_atomic, write_json_atomic

SETTINGS_FILE = "racm3.json"


@dataclass(frozen=True)
class RACM3Config:
    top_n: int = 1  # retrieved images per prompt (paper: 1)
    caption_dropout: float = 0.1  # rows trained with the unconditional prompt (reference kept)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


class PrefixRetriever:
    """Prompts -> prefix image tokens [B, top_n * N]: the top-n database images of each prompt's CLIP text
    embedding, best first, as VQ tokens of the backbone. Tokens of database images are cached by row."""

    def __init__(self, index: ClipIndex, backbone: JanusBackbone, top_n: int):
        self.index, self.backbone, self.top_n = index, backbone, top_n
        self._tokens: dict[int, torch.Tensor] = {}

    def retrieve(self, prompts: list[str], exclude: list[set[str]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(cosine scores [B, n], database rows [B, n]) of the top-n images per prompt."""
        return self.index.search(prompts, self.top_n, exclude)

    def tokens(self, rows: np.ndarray) -> torch.Tensor:
        """Database rows [B, n] -> their VQ tokens concatenated per row [B, n * N] (CPU, long)."""
        missing = sorted({int(r) for r in rows.flat} - set(self._tokens))
        if missing:
            encoded = vq_tokens(self.backbone, [self.index.path(r) for r in missing])
            self._tokens.update(zip(missing, encoded, strict=True))
        return torch.stack([torch.cat([self._tokens[int(r)] for r in row]) for row in rows])

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self.tokens(self.retrieve(prompts)[1])


def racm3_loss(backbone: JanusBackbone, batch: dict[str, torch.Tensor], generator: torch.Generator,
               caption_dropout: float) -> torch.Tensor:
    """Cross-entropy of the image tokens given reference prefix + caption (caption dropped for a
    `caption_dropout` fraction of rows, the reference kept). Batch: input_ids [b, L], attention_mask [b, L],
    image_tokens [b, N], prefix_image_tokens [b, M]."""
    ids = batch["input_ids"]
    dropped = (torch.rand(len(ids), generator=generator) < caption_dropout).to(ids.device)
    ids = torch.where(dropped[:, None], unconditional_ids(backbone, ids), ids)
    targets = batch["image_tokens"]
    logits = forward_teacher_forced(backbone, ids, targets, batch["attention_mask"],
                                    prefix_image_tokens=batch["prefix_image_tokens"])
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def finetune_racm3(backbone_source: str, train_dir: str | Path, clip_index_dir: str | Path, out_dir: str | Path,
                   checkpoint_dir: str | Path, config: RACM3Config, device: str = "cpu",
                   revision: str | None = None, tokens_file: str | Path | None = None) -> dict:
    """Fine-tune the backbone for RA-CM3 on a split folder (images/<id>.png + annotations.jsonl with captions;
    their tokens from `tokens_file` when given, else encoded here) and write `out_dir`: the fine-tuning outputs,
    racm3.json (top_n, CLIP index), retrievals.jsonl (per training example: retrieved database ids and scores)
    and metrics.json (with the Shapes retrieval accuracy)."""
    backbone = load_backbone(backbone_source, revision=revision, device=device)
    records, captions, files = finetune_pairs(train_dir)
    index = ClipIndex(clip_index_dir, device=device)
    retriever = PrefixRetriever(index, backbone, config.top_n)
    scores, rows = retriever.retrieve(captions, exclude=[{pixels_sha256(f)} for f in files])
    ids, mask = tokenize_prompts(backbone, captions)
    examples = {"input_ids": ids, "attention_mask": mask, "image_tokens": vq_tokens(backbone, files, tokens_file),
                "prefix_image_tokens": retriever.tokens(rows)}
    loss_fn = partial(racm3_loss, caption_dropout=config.caption_dropout)
    metrics = finetune(backbone, examples, loss_fn, config.finetune, out_dir, checkpoint_dir,
                       title="RA-CM3 fine-tuning")

    if distributed_rank()[0] != 0:
        return metrics
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / SETTINGS_FILE, {
        "top_n": config.top_n, "caption_dropout": config.caption_dropout,
        "clip_index": {"folder": str(clip_index_dir), "meta": index.meta}})
    lines = [json.dumps({"id": r["id"], "retrieved": [index.entries[j]["id"] for j in row],
                         "scores": [round(float(s), 5) for s in score]}) + "\n"
             for r, row, score in zip(records, rows, scores, strict=True)]
    write_bytes_atomic(out_dir / "retrievals.jsonl", "".join(lines).encode())
    metrics.update(top_n=config.top_n, caption_dropout=config.caption_dropout,
                   mean_top1_score=float(scores[:, 0].mean()))
    database_file = Path(index.root).parent / "annotations.jsonl"
    if records and "objects" in records[0] and database_file.is_file():
        database = {r["id"]: r for r in read_annotations(database_file.parent)}
        retrieved = [database[index.entries[row[0]]["id"]] for row in rows]
        metrics["retrieval"] = retrieval_accuracy(records, retrieved, list(database.values()), config.finetune.seed)
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


def load_racm3(backbone: JanusBackbone, weights_dir: str | Path, clip_index_dir: str | Path,
               device: str | torch.device = "cpu") -> tuple[PrefixRetriever, dict]:
    """Apply fine-tuned RA-CM3 weights to `backbone` and open its CLIP index -> (retriever, settings for the
    generation record). The index must hold the same CLIP as the one used in training."""
    load_finetuned(backbone, weights_dir)
    settings = json.loads((Path(weights_dir) / SETTINGS_FILE).read_text())
    index = ClipIndex(clip_index_dir, device=device)
    trained_with = settings["clip_index"]["meta"]["clip"]["weights_sha256"]
    if index.meta["clip"]["weights_sha256"] != trained_with:
        raise ValueError(f"{clip_index_dir} uses another CLIP than the one {weights_dir} was trained with")
    record = {"top_n": settings["top_n"], "clip_index": str(clip_index_dir), "clip": index.meta["clip"],
              "database_images": index.meta["n"], "weights": str(weights_dir),
              "adapter_sha256": sha256_file(Path(weights_dir) / ADAPTER_FILE)}
    return PrefixRetriever(index, backbone, settings["top_n"]), record
