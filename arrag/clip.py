"""Image-level CLIP retrieval (RA-CM3, Appendix B.1): a FAISS inner-product index over L2-normalised CLIP image
embeddings of the database images, queried with the CLIP text embedding of a prompt.

The CLIP is any open_clip model loaded by the evaluators' loader (`evaluators.cmmd.load_clip`): an
architecture name with a pretrained tag (paper scale: ViT-B-32 `openai`, 512-d) or a checkpoint file, plus a
model-config JSON for a custom architecture (the Shapes CLIP, `arrag.training.clip`). Cosine similarity =
inner product of unit vectors, so `faiss.IndexFlatIP` gives the exact top-n, as the paper computes it over all
database images.

Index folder (`build_clip_index`):
    index.faiss     IndexFlatIP over [n, D] float32 unit image embeddings, row i = entry i
    entries.jsonl   one line per row: id (file path under the image root, without suffix), path (relative to
                    the image root) and pixels_sha256 (sha256 of the decoded RGB pixels and their shape)
    meta.json       the CLIP (model, pretrained, model_config, weights sha256), image root, n, dim

A query may name images that must not be retrieved (`exclude`: pixel hashes), so that a training image never
retrieves itself, nor a pixel-identical copy of itself, when the fine-tuning images overlap the database.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from evaluators.cmmd import ClipModel, load_clip
from evaluators.features import extract_features
from evaluators.io import list_images, load_rgb, sha256_file, write_bytes_atomic, write_json_atomic

INDEX_FILE = "index.faiss"
ENTRIES_FILE = "entries.jsonl"
META_FILE = "meta.json"


@dataclass(frozen=True)
class ClipSpec:
    """Which open_clip model (the arguments of `evaluators.cmmd.load_clip`)."""

    model: str | None
    pretrained: str | None
    model_config: str | None = None


@dataclass
class ClipEncoder:
    """A loaded open_clip model with its tokenizer: unit image and text embeddings."""

    clip: ClipModel
    tokenizer: object
    spec: ClipSpec

    @property
    def device(self) -> torch.device:
        return next(self.clip.model.parameters()).device

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> [n, D] float32 unit vectors (open_clip's text embedding: the EOT token, projected)."""
        chunks = [F.normalize(self.clip.model.encode_text(self.tokenizer(texts[i:i + batch_size]).to(self.device))
                              .float(), dim=-1).cpu() for i in range(0, len(texts), batch_size)]
        return torch.cat(chunks).numpy()

    def embed_image_files(self, files: list[Path], batch_size: int = 64, num_workers: int = 0) -> np.ndarray:
        """Image files -> [n, D] float32 unit vectors, preprocessed as CMMD preprocesses them."""
        return extract_features(files, self.clip.transform, self.clip.embed, self.device, batch_size, num_workers,
                                "CLIP image embeddings").astype(np.float32)


def load_clip_encoder(spec: ClipSpec, device: str | torch.device = "cpu") -> ClipEncoder:
    clip = load_clip(spec.model, spec.pretrained, spec.model_config, device)
    return ClipEncoder(clip, open_clip.get_tokenizer(clip.name), spec)


def image_root(folder: str | Path) -> Path:
    """The folder holding a split's images: `<folder>/images` when it exists (Shapes splits keep masks beside
    it), else the folder itself."""
    folder = Path(folder)
    return folder / "images" if (folder / "images").is_dir() else folder


def pixels_sha256(path: str | Path) -> str:
    """sha256 of an image's decoded RGB pixels and shape: equal for identical pictures whatever the file."""
    pixels = np.asarray(load_rgb(path))
    return hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).hexdigest()


def build_clip_index(images: str | Path, out_dir: str | Path, encoder: ClipEncoder, batch_size: int = 64,
                     num_workers: int = 0) -> dict:
    """Embed every image under `images` (see `image_root`) and write the index folder; returns meta.json."""
    root = image_root(images)
    files = list_images(root)
    embeddings = encoder.embed_image_files(files, batch_size, num_workers)  # [n, D]
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings)
    out_dir = Path(out_dir)
    write_bytes_atomic(out_dir / INDEX_FILE, faiss.serialize_index(index).tobytes())
    lines = []
    for path in files:
        relative = path.relative_to(root).as_posix()
        lines.append(json.dumps({"id": relative.rsplit(".", 1)[0], "path": relative,
                                 "pixels_sha256": pixels_sha256(path)}) + "\n")
    write_bytes_atomic(out_dir / ENTRIES_FILE, "".join(lines).encode())
    spec = encoder.spec
    meta = {"clip": {"model": encoder.clip.name, "pretrained": spec.pretrained, "model_config": spec.model_config,
                     "weights_sha256": sha256_file(encoder.clip.weights_file)},
            "image_root": str(root), "n": len(files), "dim": int(embeddings.shape[1]), "metric": "inner product"}
    write_json_atomic(out_dir / META_FILE, meta)
    return meta


class ClipIndex:
    """A loaded index folder: text -> top-n database entries."""

    def __init__(self, folder: str | Path, encoder: ClipEncoder | None = None, device: str | torch.device = "cpu"):
        """Loads the index and, unless given, the CLIP recorded in meta.json (its weights must match)."""
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META_FILE).read_text())
        self.index = faiss.deserialize_index(np.fromfile(self.folder / INDEX_FILE, dtype=np.uint8))
        with open(self.folder / ENTRIES_FILE) as handle:
            self.entries = [json.loads(line) for line in handle if line.strip()]
        self.root = Path(self.meta["image_root"])
        clip = self.meta["clip"]
        if encoder is None:
            encoder = load_clip_encoder(ClipSpec(clip["model"], clip["pretrained"], clip["model_config"]), device)
        if sha256_file(encoder.clip.weights_file) != clip["weights_sha256"]:
            raise ValueError(f"{self.folder} was built with other CLIP weights than {encoder.clip.weights_file}")
        self.encoder = encoder

    def search(self, texts: list[str], top_n: int = 1,
               exclude: list[set[str]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-`top_n` entries per text, best first -> (scores [Q, n] cosine, rows [Q, n] entry indices).
        `exclude[q]`: pixel hashes query q must not retrieve (the search widens until n entries remain)."""
        queries = self.encoder.embed_texts(texts)
        k = min(self.index.ntotal, top_n if exclude is None else top_n + 4)
        while True:
            scores, rows = self.index.search(queries, k)
            if exclude is None:
                return scores, rows
            kept = [[(s, r) for s, r in zip(scores[q], rows[q], strict=True)
                     if self.entries[r]["pixels_sha256"] not in exclude[q]][:top_n] for q in range(len(texts))]
            if all(len(hits) == top_n for hits in kept) or k == self.index.ntotal:
                if any(len(hits) < top_n for hits in kept):
                    raise ValueError(f"fewer than {top_n} database images remain once the excluded ones are removed")
                return (np.array([[s for s, _ in hits] for hits in kept], dtype=np.float32),
                        np.array([[r for _, r in hits] for hits in kept], dtype=np.int64))
            k = min(self.index.ntotal, 4 * k)

    def path(self, row: int) -> Path:
        return self.root / self.entries[row]["path"]


# ----------------------------------------------------------------------------------------------------------
# Shapes world: does the retrieved image show what the caption names?


def named_objects(record: dict) -> Counter:
    """The objects a Shapes caption names, from its annotation: Counter of (class, colour or None), the colour
    only where the caption says it ("a red circle" vs "a circle"; "three red stars": every plural starts with
    its singular). A caption names at most one colour per class, so the phrase identifies the object."""
    caption = f" {record['caption']}"
    return Counter((o["class"], o["color"] if f" {o['color']} {o['class']}" in caption else None)
                   for o in record["objects"])


def shows_named_objects(query: dict, retrieved: dict) -> bool:
    """The retrieved Shapes image has exactly the caption's objects: the same classes with the same counts,
    and the colour of every object whose colour the caption names (positions are not checked)."""
    wanted = named_objects(query)
    have = Counter(o["class"] for o in retrieved["objects"])
    if have != Counter(o["class"] for o in query["objects"]):
        return False
    colors = Counter((o["class"], o["color"]) for o in retrieved["objects"])
    return all(colors[(cls, color)] >= count for (cls, color), count in wanted.items() if color is not None)


def retrieval_accuracy(queries: list[dict], retrieved: list[dict], database: list[dict], seed: int = 0,
                       chance_draws: int = 10) -> dict:
    """Top-1 match rate of retrieved Shapes records for query records, with chance (random database images,
    `chance_draws` per query) and the looser class-only match rate (same classes and counts)."""
    rng = np.random.default_rng(seed)
    random = [[database[i] for i in rng.integers(len(database), size=len(queries))] for _ in range(chance_draws)]

    def classes_match(q: dict, r: dict) -> bool:
        return Counter(o["class"] for o in q["objects"]) == Counter(o["class"] for o in r["objects"])

    def rate(match, pairs_with: list[dict]) -> float:
        return float(np.mean([match(q, r) for q, r in zip(queries, pairs_with, strict=True)]))

    return {"n": len(queries), "top1_objects": rate(shows_named_objects, retrieved),
            "top1_classes": rate(classes_match, retrieved),
            "chance_objects": float(np.mean([rate(shows_named_objects, draw) for draw in random])),
            "chance_classes": float(np.mean([rate(classes_match, draw) for draw in random]))}
