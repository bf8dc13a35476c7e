"""Image sources of the patch database and the leakage guards applied to them.

A source yields (image id, encoded image bytes, caption) in a fixed order, from a local copy of a dataset:

Sources are listed in ``<folder>/sources.json`` (written by `arrag fetch`: a list of `ImageSource` fields,
paths relative to the folder); a folder without one is a single ``folder`` source (a Shapes split).

* ``folder``: a Shapes-world split (``images/<id>.png``) or any folder of png/jpg files (id = file stem); no captions.
* ``parquet``: Hugging Face parquet shards (``**/*.parquet``, sorted), as Midjourney-v6-llava is published: an
  id column, an image column holding either the `datasets` Image struct ``{bytes, path}`` or raw bytes, and the
  caption column `caption_field` (Midjourney-v6-llava: ``llava``, the official fine-tuning set's caption).
* ``webdataset``: tar shards (``**/*.tar``, and gzipped ``*.tgz`` / ``*.tar.gz`` as JourneyDB publishes its
  images; sorted) as img2dataset writes CC12M and DataComp: members ``<key>.<ext>`` grouped by key; the image is
  the first jpg/jpeg/png/webp member, the id the key (or the `id_column` field of a ``<key>.json`` member when
  there is one), the caption the ``<key>.<caption_field>`` member (img2dataset: ``txt``) or that field of the json.

The files are fetched at a pinned revision by the data-acquisition step; `revision` is recorded in the
index fingerprint. Leakage guards (paper §4): an `Exclusions` list removes benchmark and fine-tuning images
by (source, id) and by sha256 of their bytes, and `holdout` keeps a fixed fraction of a source out of the database
(the official code holds out 10% of CC12M); `held_out(name, id, fraction)` is the same test the fine-tuning
split uses to pick its images, so no training image retrieves its own patches.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from evaluators.io import list_images, write_json_atomic

FORMATS = ("folder", "parquet", "webdataset")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ImageSource:
    name: str  # dataset id recorded in the fingerprint, e.g. "lmms-lab/LLaVA-ReCap-CC12M"
    path: str  # local folder holding the split / parquet files / tar shards
    format: str = "folder"
    revision: str = ""  # pinned hub revision (commit) the files were fetched at
    image_column: str = "image"
    id_column: str = "id"
    holdout: float = 0.0  # fraction of images kept out of the database by `held_out`
    images: int = 0  # images used (the paper's sample size); 0: all. Each shard keeps the first of its share.
    caption_field: str = ""  # webdataset: member extension or json field; parquet: column ("" : no captions)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"source {self.name!r}: format must be one of {FORMATS}, got {self.format!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"source {self.name!r}: holdout must be in [0, 1), got {self.holdout}")

    def files(self) -> list[Path]:
        """The source's files in reading order (images, parquet files or tar shards)."""
        root = Path(self.path)
        if self.format == "folder":
            return list_images(root / "images" if (root / "images").is_dir() else root)
        patterns = ("*.parquet",) if self.format == "parquet" else ("*.tar", "*.tgz", "*.tar.gz")
        files = sorted({p for pattern in patterns for p in root.rglob(pattern)},
                       key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise FileNotFoundError(f"source {self.name!r}: no {' / '.join(patterns)} files under {root}")
        return files

    def records(self, files: list[Path] | None = None) -> Iterator[tuple[str, bytes, str | None]]:
        """(image id, image bytes, caption or None) of the given files (default: all), in order."""
        for path in self.files() if files is None else files:
            if self.format == "folder":
                yield path.stem, path.read_bytes(), None
            elif self.format == "parquet":
                yield from read_parquet(path, self.image_column, self.id_column, self.caption_field)
            else:
                yield from read_webdataset(path, self.id_column, self.caption_field)

    def read(self, files: list[Path] | None = None) -> Iterator[tuple[str, bytes]]:
        """(image id, image bytes) of the given files (default: all), in order."""
        for image_id, data, _ in self.records(files):
            yield image_id, data


def read_sources(folder: str | Path) -> list[ImageSource]:
    """The sources of `folder`: its sources.json, or the folder itself as one `folder` source."""
    folder = Path(folder)
    listing = folder / "sources.json"
    if not listing.is_file():
        return [ImageSource(name=f"{folder.resolve().parent.name}/{folder.resolve().name}", path=str(folder))]
    return [ImageSource(**{**entry, "path": str(folder / entry["path"])}) for entry in json.loads(listing.read_text())]


def read_parquet(path: Path, image_column: str, id_column: str, caption_column: str = ""
                 ) -> Iterator[tuple[str, bytes, str | None]]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    columns = [id_column, image_column] + ([caption_column] if caption_column else [])
    missing = [c for c in columns if c not in table.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: no column {missing} (columns: {table.schema_arrow.names}); set the dataset's "
                         "id_column / image_column / caption_field in resources.datasets")
    for batch in table.iter_batches(columns=columns, batch_size=256):
        captions = batch.column(caption_column).to_pylist() if caption_column else [None] * batch.num_rows
        for image_id, image, caption in zip(batch.column(id_column).to_pylist(),
                                            batch.column(image_column).to_pylist(), captions, strict=True):
            data = image["bytes"] if isinstance(image, dict) else image
            if data is None:
                raise ValueError(f"{path}: image {image_id!r} has no embedded bytes")
            yield str(image_id), bytes(data), caption


def read_webdataset(path: Path, id_column: str, caption_field: str = "") -> Iterator[tuple[str, bytes, str | None]]:
    """Samples of one tar shard (gzipped or not); members of a sample are consecutive, as webdataset writes them."""

    def sample(key: str, members: dict[str, bytes]) -> tuple[str, bytes, str | None] | None:
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if image is None:
            return None
        fields = json.loads(members["json"]) if "json" in members else {}
        caption = None
        if caption_field in members:
            caption = members[caption_field].decode("utf-8")
        elif caption_field and caption_field in fields:
            caption = str(fields[caption_field])
        return str(fields.get(id_column, key)), image, caption

    with tarfile.open(path) as tar:
        key, members = None, {}
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            stem, _, extension = name.partition(".")
            prefix = member.name[: len(member.name) - len(name)] + stem
            if prefix != key:
                if key is not None and (item := sample(key, members)) is not None:
                    yield item
                key, members = prefix, {}
            members[extension.lower()] = tar.extractfile(member).read()
        if key is not None and (item := sample(key, members)) is not None:
            yield item


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def held_out(source_name: str, image_id: str, fraction: float) -> bool:
    """Whether an image belongs to the held-out part of its source (a fixed hash of name and id)."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{source_name}\0{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass(frozen=True)
class Exclusions:
    """Images that must not enter the database: by (source name, image id), and by sha256 of the encoded bytes
    (the same image under another name or in another source). An id alone is not a key: ids repeat across
    sources."""

    keys: frozenset[tuple[str, str]] = frozenset()
    sha256: frozenset[str] = frozenset()

    def reason(self, source: str, image_id: str, data: bytes) -> str | None:
        """'id' or 'hash' when the image is excluded, else None."""
        if (source, image_id) in self.keys:
            return "id"
        if self.sha256 and sha256_bytes(data) in self.sha256:
            return "hash"
        return None

    @classmethod
    def read(cls, path: str | Path | None) -> Exclusions:
        if path is None:
            return cls()
        try:
            data = json.loads(Path(path).read_text())
            return cls(frozenset((str(source), str(image_id)) for source, image_id in data["keys"]),
                       frozenset(data["sha256"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not an exclusion list ({type(err).__name__}: {err}); delete it and rerun "
                             "`arrag exclusion-list` (the patch_exclusions rule)") from err

    def digest(self) -> str:
        payload = json.dumps({"keys": sorted(self.keys), "sha256": sorted(self.sha256)}).encode()
        return hashlib.sha256(payload).hexdigest()


def write_exclusions(out: str | Path, folders: list[str | Path]) -> Exclusions:
    """The exclusion list of `folders`: a fine-tuning split built by `arrag finetune-split` gives the (source, id,
    sha256) of each of its images from its annotations; any other folder (benchmark references, a Shapes split)
    is read as `read_sources` reads a database folder and every image hashed."""
    keys, hashes = set(), set()
    for folder in folders:
        provenance = finetune_provenance(folder)
        if provenance is not None:
            keys.update((r["source"], r["source_id"]) for r in provenance)
            hashes.update(r["sha256"] for r in provenance)
            continue
        for source in read_sources(folder):
            for image_id, data in source.read():
                keys.add((source.name, image_id))
                hashes.add(sha256_bytes(data))
    write_json_atomic(out, {"folders": [str(f) for f in folders], "keys": sorted(keys), "sha256": sorted(hashes)})
    return Exclusions(frozenset(keys), frozenset(hashes))


def finetune_provenance(folder: str | Path) -> list[dict] | None:
    """The annotation records of a fine-tuning split that name where each image came from (source, source_id,
    sha256 of the source's bytes), or None for any other folder."""
    from arrag.shapes.dataset import read_annotations

    if not (Path(folder) / "annotations.jsonl").is_file():
        return None
    records = read_annotations(folder)
    if not records or not all({"source", "source_id", "sha256"} <= r.keys() for r in records):
        return None
    return records


def decode_image(data: bytes, size: int):
    """Encoded bytes -> RGB PIL image, shorter side resized to `size` (bilinear) and centre-cropped square
    (the official preprocessing: Resize(size) + CenterCrop(size)); images already size x size are untouched."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.size == (size, size):
        return image
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))
