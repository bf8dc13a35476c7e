"""Patch database build: sources (folder, parquet, webdataset), leakage guards, sharded = one-shot, the CLI."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import JanusVQVAE, JanusVQVAEConfig

from arrag.cli import main
from arrag.patchdb.build import IndexParams, add_shard, build_index, merge_index, train_index
from arrag.patchdb.encode import encode_shard, load_vq, read_shard
from arrag.patchdb.fingerprint import Fingerprint, FingerprintMismatch
from arrag.patchdb.index import PatchIndex
from arrag.patchdb.neighbourhood import KeySpec
from arrag.patchdb.sources import Exclusions, ImageSource, held_out, read_sources, write_exclusions


def png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.repeat(np.repeat(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), size // 4, 0), size // 4, 1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    """A tiny JanusVQVAE (16x16 images -> 4x4 grids of 32 codes) saved with save_pretrained."""
    torch.manual_seed(0)
    config = JanusVQVAEConfig(embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32,
                              channel_multiplier=[1, 1, 2], num_res_blocks=1, num_patches=4)
    model = JanusVQVAE(config).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(F.normalize(torch.randn(32, 8), dim=-1))
    folder = tmp_path_factory.mktemp("vq") / "vq"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """A split folder of 24 images (a few of them repeated, so patches share keys)."""
    folder = tmp_path_factory.mktemp("db") / "database"
    (folder / "images").mkdir(parents=True)
    for i in range(24):
        (folder / "images" / f"database-{i:03d}.png").write_bytes(png(i % 9))
    return folder


def build(tmp, vq, database, shards: int, kind: str, spec: KeySpec):
    paths = [tmp / f"shard{i}.npz" for i in range(shards)]
    for i, path in enumerate(paths):
        encode_shard(vq, read_sources(database), i, shards, spec, Exclusions(), path, batch_size=5)
    train_index(paths, tmp / "trained", IndexParams(kind=kind, nlist=4, pq_m=4, pq_bits=4, nprobe=4))
    added = [tmp / f"added{i}" for i in range(shards)]
    for path, out in zip(paths, added, strict=True):
        add_shard(tmp / "trained", path, out)
    merge_index(added[::-1], paths, tmp / "index")  # any order
    return PatchIndex.load(tmp / "index")


def patches_found(index: PatchIndex, queries: torch.Tensor) -> list[dict]:
    """Every patch for every query: {(image id, row, column): (token, distance)}."""
    tokens, distances, ids = index.search_patches(queries, index.ntotal)
    return [{where[1:]: (int(t), float(d)) for d, t, where in zip(distances[b], tokens[b], index.patch_source(ids[b]),
                                                                   strict=True)} for b in range(len(queries))]


def assert_same_patches(a: PatchIndex, b: PatchIndex, queries: torch.Tensor) -> None:
    """Both indexes find every patch with the same token at the same distance. Distances are float32 sums of up to
    96 squared differences (L12 keys: 12 x 8-d), at most ~50 (measured equal here): another summation order moves
    them by ~(8 + 12) * 6e-8 relative, inside rtol 1e-5; atol 1e-5 covers distances near 0 computed as
    |q|^2 + |k|^2 - 2 q.k (|.|^2 <= 12: ~1e-6)."""
    for found_a, found_b in zip(patches_found(a, queries), patches_found(b, queries), strict=True):
        assert found_a.keys() == found_b.keys() and len(found_a) == a.ntotal
        assert all(found_a[p][0] == found_b[p][0] for p in found_a)
        np.testing.assert_allclose([found_a[p][1] for p in found_a], [found_b[p][1] for p in found_a], rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("kind,spec", [("tokens", KeySpec("L", "1")), ("flat", KeySpec("O", "1", edge_policy="skip")),
                                       ("tokens", KeySpec("L", "12"))])
def test_sharded_build_equals_one_shot_build(tmp_path, vq_dir, database, kind, spec):
    vq = load_vq(vq_dir)
    (tmp_path / "one").mkdir()
    (tmp_path / "three").mkdir()
    one = build(tmp_path / "one", vq, database, 1, kind, spec)
    three = build(tmp_path / "three", vq, database, 3, kind, spec)
    assert one.fingerprint == three.fingerprint and one.ntotal == three.ntotal
    ((name, revision, images, patches),) = one.fingerprint.datasets
    assert name.endswith("/database") and revision == "" and images == 24 and patches == one.ntotal
    tokens = torch.from_numpy(read_shard(tmp_path / "one" / "shard0.npz")["tokens"].astype(np.int64))
    queries, usable = one.grid_queries(tokens[:3])
    queries = queries[:, usable].flatten(0, 1)
    assert_same_patches(one, three, queries)
    found, distances = three.search(queries, 1)
    assert (distances[:, 0] < 1e-5).all()  # database patches find their own neighbourhood at distance 0 (see above)


def test_codebook_keys_redefined_from_the_shards_tokens(tmp_path, vq_dir, database):
    """An O index over shards encoded for L keys (built in one call) equals one over shards encoded for O keys."""
    vq, spec = load_vq(vq_dir), KeySpec("O", "1")
    (tmp_path / "direct").mkdir()
    direct = build(tmp_path / "direct", vq, database, 2, "tokens", spec)
    paths = [tmp_path / f"shard{i}.npz" for i in range(2)]
    for i, path in enumerate(paths):
        encode_shard(vq, read_sources(database), i, 2, KeySpec("L", "1"), Exclusions(), path, batch_size=5)
    build_index(paths, tmp_path / "index", IndexParams(kind="tokens", nlist=4, nprobe=4), spec)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".index")) == []  # work files removed
    redefined = PatchIndex.load(tmp_path / "index", expected=Fingerprint.expected(direct.codebook, 4, spec))
    assert redefined.fingerprint == direct.fingerprint
    tokens = torch.from_numpy(read_shard(paths[0])["tokens"].astype(np.int64))
    queries, usable = direct.grid_queries(tokens[:3])
    queries = queries[:, usable].flatten(0, 1)
    assert_same_patches(redefined, direct, queries)
    with pytest.raises(ValueError, match="only codebook-space keys"):
        train_index(paths, tmp_path / "latent", IndexParams(kind="flat"), KeySpec("O", "1", key_space="latent"))


def test_latent_ivfpq_build_and_fingerprint_check(tmp_path, vq_dir, database):
    vq = load_vq(vq_dir)
    spec = KeySpec("L", "1", key_space="latent")
    index = build(tmp_path, vq, database, 2, "ivfpq", spec)  # OPQ trains 256 centroids: 384 keys suffice
    assert index.nprobe == 4 and index.ntotal == 24 * 16
    tokens = torch.from_numpy(read_shard(tmp_path / "shard0.npz")["tokens"].astype(np.int64))
    queries, usable = index.grid_queries(tokens[:2])
    result, distances = index.search(queries[:, usable].flatten(0, 1), 5)
    assert ((result >= 0) | (result == -1)).all() and torch.isfinite(distances[:, 0]).all()
    added, shards = [tmp_path / "added0", tmp_path / "added1"], [tmp_path / "shard0.npz", tmp_path / "shard1.npz"]
    merge_index(added, shards, tmp_path / "ondisk" / "index", ondisk=True)  # lists in index.ivfdata beside it
    ondisk = PatchIndex.load(tmp_path / "ondisk" / "index", nprobe=4)
    # merge_index orders the shards, so both hold the same lists in the same order: the same scan and sums, equal
    # results even among PQ ties
    assert torch.equal(ondisk.search(queries[:, usable].flatten(0, 1), 5)[0], result)
    codebook = index.codebook
    PatchIndex.load(tmp_path / "index", expected=Fingerprint.expected(codebook, 4, spec))
    with pytest.raises(FingerprintMismatch, match="key_space"):
        PatchIndex.load(tmp_path / "index", expected=Fingerprint.expected(codebook, 4, KeySpec("L", "1")))
    with pytest.raises(FingerprintMismatch, match="codebook"):
        PatchIndex.load(tmp_path / "index", expected=Fingerprint.expected(codebook.flip(0), 4, spec))


def test_official_nprobe_probes_exactly_one_list(tmp_path, vq_dir, database):
    """`official_nprobe` replaces the configured nprobe by 1, as the official runs probed (their nprobe, set on the
    OPQ wrapper, never reached the IVF): an ivfpq index built with it visits one inverted list per query."""
    import faiss

    spec = KeySpec("L", "1", key_space="latent")
    shard = tmp_path / "shard.npz"
    encode_shard(load_vq(vq_dir), read_sources(database), 0, 1, spec, Exclusions(), shard, batch_size=5)
    tokens = torch.from_numpy(read_shard(shard)["tokens"][:2].astype(np.int64))
    visited = {}
    for official in (False, True):
        out = tmp_path / f"official_{official}" / "index"
        build_index([shard], out, IndexParams(kind="ivfpq", nlist=4, pq_m=4, pq_bits=4, nprobe=3,
                                              official_nprobe=official))
        index = PatchIndex.load(out)
        queries, usable = index.grid_queries(tokens)
        queries = np.ascontiguousarray(queries[:, usable].flatten(0, 1).numpy())
        faiss.cvar.indexIVF_stats.reset()
        index.backend.search(queries, 5)
        visited[official] = (index.nprobe, faiss.cvar.indexIVF_stats.nlist / len(queries))
    assert visited == {False: (3, 3), True: (1, 1)}
    build_index([shard], tmp_path / "tokens" / "index", IndexParams(kind="tokens", nprobe=3, official_nprobe=True),
                KeySpec("L", "1"))
    assert PatchIndex.load(tmp_path / "tokens" / "index").nprobe == 1


def test_exclusions_by_source_and_id_and_by_hash_and_holdout(tmp_path, vq_dir, database):
    benchmark = tmp_path / "benchmark"
    benchmark.mkdir()
    (benchmark / "database-000.png").write_bytes(png(1000))  # another source's image under a database id: kept
    (benchmark / "mjhq-1.png").write_bytes((database / "images" / "database-005.png").read_bytes())  # same bytes
    finetune = tmp_path / "finetune"  # a fine-tuning split naming a database image by (source, id)
    finetune.mkdir()
    name = read_sources(database)[0].name
    (finetune / "annotations.jsonl").write_text(json.dumps(
        {"id": "finetune-000000", "caption": "x", "source": name, "source_id": "database-007", "sha256": "0" * 64}))
    exclusions = write_exclusions(tmp_path / "exclusions.json", [benchmark, finetune])
    assert Exclusions.read(tmp_path / "exclusions.json") == exclusions
    meta = encode_shard(load_vq(vq_dir), read_sources(database), 0, 1, KeySpec(), exclusions, tmp_path / "s.npz")
    ids = set(read_shard(tmp_path / "s.npz")["image_ids"].tolist())
    assert meta["sources"][0]["excluded_id"] == 1 and "database-007" not in ids and "database-000" in ids
    # database-005 and the other copies of its pixels (i % 9 == 5) share its bytes: all excluded by hash
    assert meta["sources"][0]["excluded_hash"] == 3 and not ids & {"database-005", "database-014", "database-023"}
    source = ImageSource("held", str(database), holdout=0.5)
    kept = encode_shard(load_vq(vq_dir), [source], 0, 1, KeySpec(), Exclusions(), tmp_path / "h.npz")
    kept_ids = set(read_shard(tmp_path / "h.npz")["image_ids"].tolist())
    assert kept_ids == {f"database-{i:03d}" for i in range(24) if not held_out("held", f"database-{i:03d}", 0.5)}
    assert 0 < kept["sources"][0]["held_out"] < 24


def test_parquet_and_webdataset_sources(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "cc" / "data").mkdir(parents=True)
    for part in range(2):  # the `datasets` Image feature: a struct of bytes and path
        ids = [f"cc-{part}-{i}" for i in range(3)]
        images = [{"bytes": png(10 * part + i), "path": f"{i}.png"} for i in range(3)]
        pq.write_table(pa.table({"id": ids, "image": images, "caption": ["x"] * 3}),
                       tmp_path / "cc" / "data" / f"train-{part:05d}.parquet")
    (tmp_path / "dc").mkdir()
    with tarfile.open(tmp_path / "dc" / "00000.tar", "w") as tar:
        for i in range(3):
            for name, data in ((f"{i:05d}.jpg", png(50 + i)), (f"{i:05d}.txt", b"caption"),
                               (f"{i:05d}.json", json.dumps({"uid": f"uid{i}"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "sources.json").write_text(json.dumps([
        {"name": "lmms-lab/LLaVA-ReCap-CC12M", "path": "cc", "format": "parquet", "revision": "a" * 40,
         "holdout": 0.0, "images": 5},
        {"name": "datacomp", "path": "dc", "format": "webdataset", "id_column": "uid"}]))
    cc, dc = read_sources(tmp_path)
    assert [i for i, _ in cc.read()] == [f"cc-{p}-{i}" for p in range(2) for i in range(3)]
    assert next(iter(cc.read()))[1] == png(0)
    assert list(dc.read()) == [(f"uid{i}", png(50 + i)) for i in range(3)]
    from arrag.patchdb.encode import shard_images

    counts = []
    chosen = list(shard_images([cc, dc], 1, 2, Exclusions(), counts))  # 2 parquet files: shard 1 reads file 1
    assert [c["kept"] for c in counts] == [2, 1] and counts[0]["over_quota"] == 1  # quota 5 // 2 + 1 / 2
    assert [image_id for _, image_id, _ in chosen] == ["cc-1-0", "cc-1-1", "uid1"]


def test_a_source_with_fewer_files_than_shards_is_cut_by_file_and_position(tmp_path):
    """2 archives (one gzipped, as JourneyDB's) of 5 images into 3 shards: 2 parts per file, units (file, part)
    dealt round-robin; every image lands in exactly one shard, and a shard opens only the files of its units."""
    from arrag.patchdb.encode import shard_images

    (tmp_path / "jdb").mkdir()
    for number, mode in ((0, "w"), (1, "w:gz")):
        with tarfile.open(tmp_path / "jdb" / f"{number:03d}.{'tar' if mode == 'w' else 'tgz'}", mode) as tar:
            for i in range(5):
                data = png(10 * number + i)
                info = tarfile.TarInfo(f"{number}{i:04d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    opened = []

    class Recorded(ImageSource):
        def read(self, files=None):
            opened.append([f.name for f in files])
            return super().read(files)

    recorded = Recorded("journeydb", str(tmp_path / "jdb"), format="webdataset")
    per_shard = {}
    for shard in range(3):
        opened.clear()
        per_shard[shard] = ([image_id for _, image_id, _ in shard_images([recorded], shard, 3, Exclusions(), [])],
                            sorted({name for files in opened for name in files}))
    assert per_shard == {0: (["00000", "00002", "00004", "10001", "10003"], ["000.tar", "001.tgz"]),
                         1: (["00001", "00003"], ["000.tar"]),
                         2: (["10000", "10002", "10004"], ["001.tgz"])}


def test_cli_builds_the_index_and_the_figure_6_analysis(tmp_path, vq_dir, database, monkeypatch):
    heldout = tmp_path / "heldout"
    (heldout / "images").mkdir(parents=True)
    for i in range(4):
        (heldout / "images" / f"heldout-{i}.png").write_bytes(png(100 + i))
    out = tmp_path / "index"
    assert main(["exclusion-list", "--out", str(out / "exclusions.json"), str(heldout)]) == 0
    shards = [str(out / f"shards/{i}.npz") for i in range(2)]
    for i, shard in enumerate(shards):
        assert main(["encode-patches", "--images", str(database), "--vq", str(vq_dir), "--shard", str(i),
                     "--shards", "2", "--exclusions", str(out / "exclusions.json"), "--device", "cpu",
                     "--out", shard]) == 0
    assert main(["train-index", "--type", "tokens", "--out", str(out / "trained.tokens"), *shards]) == 0
    added = [str(out / f"added/{i}.faiss") for i in range(2)]
    for shard, path in zip(shards, added, strict=True):
        assert main(["add-shard", "--trained", str(out / "trained.tokens"), "--shard", shard, "--out", path]) == 0
    assert main(["merge-index", "--added", *added, "--shards", *shards, "--out", str(out / "index.tokens")]) == 0
    csv_path, png_path = tmp_path / "fig6.csv", tmp_path / "fig6.png"
    assert main(["retrieval-analysis", "--index", str(out / "index.tokens"), "--vq", str(vq_dir), "--images",
                 str(heldout), "--k", "5", "--csv", str(csv_path), "--png", str(png_path)]) == 0
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "k,mean_distance,mean_random_distance,match_rate,positions" and len(lines) == 6
    assert png_path.read_bytes()[:4] == b"\x89PNG"

    # --limit streams: no image past the limit is read (the paper's fine-tuning split is 50K images)
    import arrag.patchdb.sources as sources

    original, read = sources.read_sources, []

    class Counted:
        def __init__(self, source):
            self.source = source

        def read(self):
            for image_id, data in self.source.read():
                read.append(image_id)
                yield image_id, data

    monkeypatch.setattr(sources, "read_sources", lambda root: [Counted(s) for s in original(root)])
    assert main(["retrieval-analysis", "--index", str(out / "index.tokens"), "--vq", str(vq_dir), "--images",
                 str(heldout), "--k", "5", "--limit", "2", "--csv", str(csv_path), "--png", str(png_path)]) == 0
    assert len(read) == 2
