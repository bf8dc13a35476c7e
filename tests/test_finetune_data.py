"""The paper-scale fine-tuning split from fixtures in the real formats: img2dataset webdataset shards (jpg / txt / json,
plain and gzipped as JourneyDB's .tgz) and Midjourney-v6-llava-style parquet; and the exclusion list it feeds."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from arrag.cli import main
from arrag.finetune_data import build_finetune_split
from arrag.patchdb.encode import shard_images
from arrag.patchdb.sources import Exclusions, held_out, read_sources, sha256_bytes, write_exclusions
from arrag.training.finetune import finetune_pairs

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


def jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A random non-square JPEG (the split squares it)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path, samples: list[dict[str, bytes]], mode: str = "w") -> None:
    """A webdataset shard as img2dataset writes it: members <key>.<ext>, a sample's members consecutive."""
    with tarfile.open(path, mode) as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def sources(tmp_path):
    """Fetched fine-tuning datasets: a CC12M-like webdataset (two shards, one gzipped; 10 % held out of the
    database) and a Midjourney-v6-llava-like parquet (`llava` captions, one row without)."""
    root = tmp_path / "finetune_sources"
    (root / "cc12m").mkdir(parents=True)
    samples = [(f"{i:09d}", {"jpg": jpeg(i), "txt": f"a photo number {i}".encode(),
                             "json": json.dumps({"key": f"{i:09d}", "status": "success"}).encode()})
               for i in range(60)]
    write_tar(root / "cc12m" / "00000.tar", samples[:30])
    write_tar(root / "cc12m" / "00001.tgz", samples[30:], mode="w:gz")
    (root / "midjourney_v6").mkdir()
    rows = {"id": [f"mj-{i}" for i in range(8)], "image": [{"bytes": jpeg(100 + i), "path": None} for i in range(8)],
            "prompt": ["prompt"] * 8, "llava": [None if i == 2 else f"llava caption {i}" for i in range(8)]}
    pq.write_table(pa.table(rows), root / "midjourney_v6" / "train-00000.parquet")
    (root / "sources.json").write_text(json.dumps([
        {"name": "pixparse/cc12m-wds", "path": "cc12m", "format": "webdataset", "revision": "a" * 40,
         "id_column": "key", "caption_field": "txt", "holdout": 0.1, "images": 3},
        {"name": "brivangl/midjourney-v6-llava", "path": "midjourney_v6", "format": "parquet", "revision": "b" * 40,
         "caption_field": "llava", "images": 4}]))
    return root


def test_readers_give_ids_images_and_captions_from_tar_tgz_and_parquet(sources):
    cc, mj = read_sources(sources)
    assert [p.name for p in cc.files()] == ["00000.tar", "00001.tgz"]
    records = list(cc.records())
    assert len(records) == 60 and records[45] == (f"{45:09d}", jpeg(45), "a photo number 45")  # from the .tgz
    assert [caption for _, _, caption in mj.records()][:3] == ["llava caption 0", "llava caption 1", None]
    assert next(iter(mj.read())) == ("mj-0", jpeg(100))


def test_split_takes_captioned_pairs_from_the_held_out_part_only(sources, tmp_path):
    out = tmp_path / "finetune"
    summary = build_finetune_split(sources, out, image_size=24)
    records = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    cc_ids = [r["source_id"] for r in records if r["source"] == "pixparse/cc12m-wds"]
    expected = [f"{i:09d}" for i in range(60) if held_out("pixparse/cc12m-wds", f"{i:09d}", 0.1)][:3]
    assert cc_ids == expected  # the first held-out images in reading order: never in the database
    assert [r["source_id"] for r in records if r["source"].startswith("brivangl")] == ["mj-0", "mj-1", "mj-3", "mj-4"]
    assert records[3]["caption"] == "llava caption 0" and records[0]["caption"] == f"a photo number {int(expected[0])}"
    assert records[0]["sha256"] == sha256_bytes(jpeg(int(expected[0])))  # of the source's bytes, as the database reads
    cc, mj = summary["sources"]
    assert cc["taken"] == 3 and cc["in_database_part"] == int(expected[-1]) + 1 - 3
    assert mj == {**mj, "taken": 4, "no_caption": 1, "in_database_part": 0}
    # the layout every fine-tuning step reads: images/<id>.png (squared) + captions
    _, captions, files = finetune_pairs(out)
    assert len(files) == 7 and captions[4] == "llava caption 1"
    assert all(Image.open(f).size == (24, 24) for f in files)


def test_split_refuses_a_shortfall_or_a_source_without_captions_and_writes_nothing(sources, tmp_path):
    listing = json.loads((sources / "sources.json").read_text())
    listing[1]["images"] = 8  # 7 rows have a caption
    (sources / "sources.json").write_text(json.dumps(listing))
    with pytest.raises(ValueError, match=r"brivangl/midjourney-v6-llava: 7 usable .* 8 asked .*finetune_images"):
        build_finetune_split(sources, tmp_path / "finetune", image_size=24)
    listing[1]["caption_field"] = ""
    (sources / "sources.json").write_text(json.dumps(listing))
    with pytest.raises(ValueError, match="needs a caption_field"):
        build_finetune_split(sources, tmp_path / "finetune", image_size=24)
    assert list(tmp_path.iterdir()) == [sources]  # no output, no temporary folder left


def test_exclusions_of_the_split_keep_its_images_out_of_the_database_by_source_and_id(sources, tmp_path):
    """The database reads CC12M with the fine-tuning images' ids: those (and their bytes anywhere) are excluded, an
    image of another source under the same id is not."""
    out = tmp_path / "finetune"
    assert main(["finetune-split", "--sources", str(sources), "--out", str(out), "--image-size", "24"]) == 0
    exclusions = write_exclusions(tmp_path / "exclusions.json", [out])
    taken = [json.loads(line)["source_id"] for line in (out / "annotations.jsonl").read_text().splitlines()][:3]
    assert ("pixparse/cc12m-wds", taken[0]) in exclusions.keys and len(exclusions.sha256) == 7
    database = tmp_path / "database"
    (database / "cc12m").mkdir(parents=True)
    (database / "other").mkdir()
    write_tar(database / "cc12m" / "00000.tar", [(key, {"jpg": jpeg(int(key)), "txt": b"x"}) for key in taken])
    write_tar(database / "other" / "00000.tar", [(taken[0], {"jpg": jpeg(999)})])  # same id, another source
    (database / "sources.json").write_text(json.dumps([
        {"name": "pixparse/cc12m-wds", "path": "cc12m", "format": "webdataset"},
        {"name": "journeydb", "path": "other", "format": "webdataset"}]))
    counts = []
    kept = [(index, image_id) for index, image_id, _ in shard_images(read_sources(database), 0, 1,
                                                                      Exclusions.read(tmp_path / "exclusions.json"),
                                                                      counts)]
    assert kept == [(1, taken[0])] and counts[0]["excluded_id"] == 3
