"""The paper-scale fine-tuning split (Appendix B.3): image-caption pairs from the fetched fine-tuning sources, in the
layout every fine-tuning step reads (``images/<id>.png`` + ``annotations.jsonl``, as a Shapes split).

The paper samples 50K pairs, 25K from CC12M and 25K from Midjourney-v6 (the official script: the `llava` caption
of Midjourney-v6-llava, the LLaVA recaption of CC12M). Per source of ``<sources>/sources.json`` (`arrag fetch
datasets --role finetune`, whose files were already drawn at random with the run's seed), the split takes the first
`images` pairs in reading order that have a caption and decode, and for a source that the patch database also
reads (a `holdout` fraction) only images of its held-out part, so no fine-tuning image is in the database. Images
are resized (shorter side) and centre-cropped to the backbone's resolution, as the database encoder does.

Each annotation record names its origin, ``{"id", "caption", "source", "source_id", "sha256"}`` (the sha256 of the
source's bytes): the exclusion list (`arrag exclusion-list`) reads it to keep these images out of the database by
(source, id) and by content. The folder is written under a temporary name and renamed: a killed job leaves none.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from arrag.fetch import replace, scratch
from arrag.patchdb.sources import decode_image, held_out, read_sources, sha256_bytes
from evaluators.io import write_json_atomic


def build_finetune_split(sources_dir: str | Path, out: str | Path, image_size: int) -> dict:
    """Write the split into `out` and return its summary (also `out/summary.json`): per source the pairs taken and
    the images passed over (in the database's part, without a caption, undecodable)."""
    sources_dir, out = Path(sources_dir), Path(out)
    sources = read_sources(sources_dir)
    for source in sources:
        if not source.caption_field or not source.images:
            raise ValueError(f"{sources_dir / 'sources.json'}: source {source.name!r} needs a caption_field and an "
                             "image count: set caption_field and finetune_images of that dataset in "
                             "resources.datasets and fetch the fine-tuning datasets again")
    records, summary = [], {"image_size": image_size, "sources": []}
    with scratch(out.parent, out.name) as staging:
        (staging / "images").mkdir()
        for source in sources:
            count = {"name": source.name, "revision": source.revision, "taken": 0, "in_database_part": 0,
                     "no_caption": 0, "undecodable": 0}
            summary["sources"].append(count)
            progress = tqdm(total=source.images, desc=f"fine-tuning pairs: {source.name}", unit="img", mininterval=5)
            for image_id, data, caption in source.records():
                if source.holdout and not held_out(source.name, image_id, source.holdout):
                    count["in_database_part"] += 1
                    continue
                if not caption or not caption.strip():
                    count["no_caption"] += 1
                    continue
                try:
                    image = decode_image(data, image_size)
                except OSError:  # PIL's UnidentifiedImageError and truncated files
                    count["undecodable"] += 1
                    continue
                name = f"finetune-{len(records):06d}"
                image.save(staging / "images" / f"{name}.png")
                records.append({"id": name, "caption": caption.strip(), "source": source.name,
                                "source_id": image_id, "sha256": sha256_bytes(data)})
                count["taken"] += 1
                progress.update()
                if count["taken"] == source.images:
                    break
            progress.close()
            if count["taken"] < source.images:
                raise ValueError(f"{source.name}: {count['taken']} usable image-caption pairs in the fetched files, "
                                 f"{source.images} asked ({count}); fetch more of its files (resources.subsample) "
                                 "or lower its finetune_images in resources.datasets")
        (staging / "annotations.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        write_json_atomic(staging / "summary.json", summary)
        replace(staging, out)
    return summary
