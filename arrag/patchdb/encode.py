"""Images -> token grids (and latents) of one database shard, written atomically as a .npz file.

A shard file holds everything later steps need, so they never load the VQ again:

    tokens     [n, h, w]     uint16   VQ tokens (Janus-Pro rule: L2-normalised z and codebook)
    latents    [n, h, w, d]  float32  L2-normalised encoder outputs (key space `latent` only)
    image_ids  [n]           str      id of each image in its source
    source     [n]           uint8    index into meta["sources"]
    codebook   [V, d]        float32  the vectors codebook keys and queries use (`codebook_vectors(normalized=True)`)
    meta                     str      JSON: fingerprint fields, shard / shards, per-source counts

Keys are not stored: they are a deterministic function of these grids (`arrag.patchdb.neighbourhood`), built
when the shard is added to the index, which keeps a shard 4-8x smaller than its keys.

Sharding: the files of each source are cut into units (file f, part p), P = ceil(shards / files) parts per file
(part p: the file's images at positions p, p + P, ...), and shard j takes units j, j + shards, ... . With at least
as many files as shards a unit is a whole file; with fewer (JourneyDB's 200 archives into 256 shards) a job reads
only the one or two files its units are in, never the whole source. No image is dropped or seen twice. Excluded
(benchmark / fine-tuning) and held-out images are counted and skipped.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from arrag.models.checkpoint import check_safetensors_folder
from arrag.models.vq import codebook_vectors, encode_latents, is_magvit2, quantize_latents
from arrag.patchdb.fingerprint import Fingerprint
from arrag.patchdb.neighbourhood import KeySpec
from arrag.patchdb.sources import Exclusions, ImageSource, decode_image, held_out
from arrag.patchdb.token_index import token_dtype


def load_vq(source: str | Path, revision: str | None = None, image_size: int | None = None) -> nn.Module:
    """The image tokenizer from a `JanusVQVAE` folder / hub id, from a Janus backbone (its `vqmodel`), or Show-o's
    MAGVIT-v2 (`showlab/magvitv2`; config.json `_class_name` MAGVITv2) used at `image_size` pixels (default 256)."""
    from huggingface_hub import hf_hub_download
    from transformers import JanusForConditionalGeneration, JanusVQVAE

    from arrag.models.magvit2 import load_magvit2

    local = Path(source) / "config.json"
    try:
        path = local if local.is_file() else Path(hf_hub_download(str(source), "config.json", revision=revision))
    except Exception as err:  # offline, unknown repo or revision, or a folder without config.json
        raise FileNotFoundError(f"image tokenizer {str(source)!r}: neither a local folder with config.json nor a "
                                f"reachable Hugging Face repo (revision {revision!r})") from err
    config = json.loads(path.read_text())
    check_safetensors_folder(source)
    if config.get("_class_name") == "MAGVITv2":
        return load_magvit2(str(source), revision, dtype=torch.float32, image_size=image_size)
    model_type = config.get("model_type")
    if model_type == "janus":
        model = JanusForConditionalGeneration.from_pretrained(source, revision=revision, trust_remote_code=False)
        return model.model.vqmodel.eval()
    if model_type == "janus_vqgan":
        return JanusVQVAE.from_pretrained(source, revision=revision, trust_remote_code=False).eval()
    raise ValueError(f"{source}: expected a JanusVQVAE or a Janus backbone, found model_type {model_type!r}")


def vq_geometry(vq: nn.Module) -> tuple[int, int]:
    """(image side in pixels, token grid side) of a JanusVQVAE or a MAGVIT-v2."""
    if is_magvit2(vq):
        return vq.config.image_size, vq.config.image_size // vq.config.downsample
    grid = vq.config.num_patches
    return grid * 2 ** (len(vq.config.channel_multiplier) - 1), grid


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> None:
    """np.savez to a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shard_images(sources: list[ImageSource], shard: int, shards: int, exclusions: Exclusions, counts: list[dict]
                 ) -> Iterator[tuple[int, str, bytes]]:
    """The (source index, image id, bytes) of one shard, streamed; appends per-source counts of what was read,
    kept, excluded (by id / by hash), held out and left over the source's `images` quota to `counts`."""
    for index, source in enumerate(sources):
        files = source.files()
        parts = -(-shards // len(files))  # per file: 1 when there are at least as many files as shards
        units = [(file, part) for file in files for part in range(parts)][shard::shards]
        quota = source.images // shards + (shard < source.images % shards) if source.images else None
        count = {"name": source.name, "revision": source.revision, "format": source.format, "read": 0,
                 "kept": 0, "excluded_id": 0, "excluded_hash": 0, "held_out": 0, "over_quota": 0}
        counts.append(count)
        for image_id, data in (item for file, part in units
                               for position, item in enumerate(source.read([file])) if position % parts == part):
            count["read"] += 1
            reason = exclusions.reason(source.name, image_id, data)
            if reason is not None:
                count[f"excluded_{reason}"] += 1
            elif held_out(source.name, image_id, source.holdout):
                count["held_out"] += 1
            elif quota is not None and count["kept"] >= quota:
                count["over_quota"] += 1
            else:
                count["kept"] += 1
                yield index, image_id, data


def to_model_input(images: list) -> torch.Tensor:
    """RGB PIL images -> float [B, 3, H, W] in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


@torch.no_grad()
def encode_images(vq: nn.Module, images: list[bytes], batch_size: int = 64, with_latents: bool = False,
                  desc: str = "encode") -> tuple[np.ndarray, np.ndarray | None]:
    """Encoded image bytes -> (tokens [n, h, w] uint16, L2-normalised latents [n, h, w, d] float32 or None)."""
    size, grid = vq_geometry(vq)
    codebook = codebook_vectors(vq, normalized=True).detach().float()
    tokens = np.zeros((len(images), grid, grid), dtype=token_dtype(len(codebook)))
    latents = np.zeros((len(images), grid, grid, codebook.shape[1]), np.float32) if with_latents else None
    device = next(vq.parameters()).device
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", mininterval=5, disable=not desc):
        batch = [decode_image(data, size) for data in images[start:start + batch_size]]
        z = encode_latents(vq, to_model_input(batch).to(device), l2_normalized=True).float()  # [B, h, w, d]
        tokens[start:start + len(batch)] = quantize_latents(vq, z).cpu().numpy()
        if latents is not None:
            latents[start:start + len(batch)] = z.cpu().numpy()
    return tokens, latents


@torch.no_grad()
def encode_shard(vq: nn.Module, sources: list[ImageSource], shard: int, shards: int, spec: KeySpec,
                 exclusions: Exclusions, out: str | Path, batch_size: int = 64) -> dict:
    """Encode shard `shard` of `shards` of the sources into `out` (layout in the module docstring)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} out of range for {shards} shards")
    grid = vq_geometry(vq)[1]
    codebook = codebook_vectors(vq, normalized=True).detach().float()
    counts, ids, source_index, tokens, latents = [], [], [], [], []
    stream = tqdm(shard_images(sources, shard, shards, exclusions, counts), desc=f"encode shard {shard}",
                  unit="img", mininterval=5)
    batch = []
    for item in itertools.chain(stream, [None]):  # None flushes the last, partial batch
        if item is not None:
            batch.append(item)
        if batch and (item is None or len(batch) == batch_size):
            batch_tokens, batch_latents = encode_images(vq, [data for _, _, data in batch], batch_size,
                                                        spec.key_space == "latent", desc="")
            ids += [image_id for _, image_id, _ in batch]
            source_index += [index for index, _, _ in batch]
            tokens.append(batch_tokens)
            latents.append(batch_latents)
            batch = []
    fingerprint = Fingerprint.expected(codebook, grid, spec).to_dict()
    meta = {"fingerprint": fingerprint, "shard": shard, "shards": shards, "sources": counts,
            "exclusions_sha256": exclusions.digest(), "images": len(ids)}
    empty = np.zeros((0, grid, grid), token_dtype(len(codebook)))
    arrays = {"tokens": np.concatenate(tokens) if tokens else empty, "image_ids": np.array(ids, dtype=str),
              "source": np.array(source_index, dtype=np.uint8), "codebook": codebook.cpu().numpy(),
              "meta": np.array(json.dumps(meta))}
    if spec.key_space == "latent":
        arrays["latents"] = (np.concatenate(latents) if latents
                             else np.zeros((0, grid, grid, codebook.shape[1]), np.float32))
    save_npz_atomic(out, **arrays)
    return meta


def read_shard(path: str | Path, with_latents: bool = False) -> dict:
    """A shard file as a dict of arrays, `meta` decoded (latents only if asked: they are large)."""
    with np.load(path, allow_pickle=False) as data:
        shard = {name: data[name] for name in ("tokens", "image_ids", "source", "codebook")}
        shard["meta"] = json.loads(str(data["meta"]))
        if with_latents:
            if "latents" not in data:
                raise ValueError(f"{path} has no latents: it was encoded for the codebook key space")
            shard["latents"] = data["latents"]
    return shard


def shard_meta(path: str | Path) -> dict:
    """Only the JSON metadata of a shard file (cheap: npz members are read lazily)."""
    with np.load(path, allow_pickle=False) as data:
        return json.loads(str(data["meta"]))


