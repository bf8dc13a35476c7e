"""Data acquisition without network: GitHub archives built from the real benchmark files beside the repository,
and a fake Hugging Face Hub (HfApi, hf_hub_download) serving local files with the hub's checksums."""

import hashlib
import io
import json
import re
import tarfile
import zipfile
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError
from huggingface_hub.hf_api import RepoFile

from arrag import cli
from arrag.config import load
from arrag.fetch import (
    DatasetSpec,
    FetchError,
    RepoSpec,
    choose_files,
    fetch_backbone,
    fetch_benchmark,
    fetch_datasets,
    git_blob_oid,
    git_tree_oid,
    github_archive,
)

REPO = Path(__file__).resolve().parent.parent
PAPER = load(REPO / "config" / "config.yaml")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def github_tarball(cache: Path, repo: str, commit: str, files: dict[str, bytes]) -> Path:
    """A GitHub-style source archive (top folder <name>-<commit>/) where github_archive caches it."""
    target = cache / "github" / f"{repo.replace('/', '+')}-{commit}.tar.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target, "w:gz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(f"{repo.split('/')[1]}-{commit}/{path}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return target


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access in a test")

    monkeypatch.setattr("urllib.request.urlopen", refuse)


class FakeHub:
    """Repositories of local files at one commit each; counts downloads; can fail on demand."""

    def __init__(self, root: Path):
        self.root = root
        self.repos: dict[str, tuple[str, dict[str, bytes]]] = {}
        self.gated: set[str] = set()
        self.downloads: list[str] = []
        self.fail_after: int | None = None
        self.corrupt: set[str] = set()

    def add(self, repo: str, files: dict[str, bytes], commit: str = COMMIT) -> None:
        self.repos[repo] = (commit, files)

    def check(self, repo: str, revision: str | None) -> tuple[str, dict[str, bytes]]:
        if repo in self.gated:
            request = httpx2.Request("GET", f"https://huggingface.co/api/datasets/{repo}")
            raise GatedRepoError(f"403 Client Error: access to {repo} is restricted",
                                 response=httpx2.Response(403, request=request))
        commit, files = self.repos[repo]
        assert revision in (None, commit)
        return commit, files

    def install(self, monkeypatch) -> None:
        hub = self

        class Api:
            def repo_info(self, repo, repo_type=None, revision=None):
                return type("Info", (), {"sha": hub.check(repo, revision)[0]})()

            def list_repo_tree(self, repo, recursive=False, revision=None, repo_type=None):
                _, files = hub.check(repo, revision)
                for path, data in files.items():
                    large = path.endswith((".tar", ".zip", ".safetensors", ".parquet"))
                    lfs = {"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 130}
                    blob = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
                    yield RepoFile(path=path, size=len(data), oid=blob, lfs=lfs if large else None)

        def download(repo, filename, repo_type=None, revision=None, cache_dir=None):
            commit, files = hub.check(repo, revision)
            target = Path(cache_dir) / repo.replace("/", "--") / commit / filename
            if not target.is_file():
                if hub.fail_after is not None and len(hub.downloads) >= hub.fail_after:
                    raise OSError("connection reset (simulated kill)")
                hub.downloads.append(filename)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(b"garbage" if filename in hub.corrupt else files[filename])
            return str(target)

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub")
    fake.install(monkeypatch)
    return fake


# ---------------------------------------------------------------- checksums and pins
def test_git_object_ids_match_git(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_bytes(b"hello\n")
    (tmp_path / "d" / "sub" / "b.txt").write_bytes(b"")
    # `git hash-object` and `git write-tree` of the same content
    assert git_blob_oid(tmp_path / "d" / "a.txt") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert git_blob_oid(tmp_path / "d" / "sub" / "b.txt") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_tree_oid(tmp_path / "d") == "2979ea0d12fbde309f63906aa8d516f91a69a286"


def test_the_pinned_object_ids_are_those_of_the_real_benchmark_files(shared_benchmarks):
    """The paper config's GitHub pins identify the real GenEval metadata and DPG-Bench prompts."""
    geneval = {f["to"]: f["git_oid"] for f in PAPER["resources"]["benchmarks"]["geneval"]["files"]}
    dpg = {f["to"]: f["git_oid"] for f in PAPER["resources"]["benchmarks"]["dpg_bench"]["files"]}
    for name in ("evaluation_metadata.jsonl", "object_names.txt"):
        assert git_blob_oid(shared_benchmarks / "geneval" / name) == geneval[name]
    assert git_tree_oid(shared_benchmarks / "dpg_bench" / "prompts") == dpg["prompts"]


def test_paper_config_pins_only_what_is_known():
    resources = PAPER["resources"]
    for name, spec in resources["benchmarks"].items():
        if spec["host"] == "github":
            assert spec["revision"] and all(f["git_oid"] for f in spec["files"]), name
    for revision in (resources["benchmarks"]["mjhq"]["revision"], PAPER["backbone"]["revision"]):
        assert re.fullmatch(r"[0-9a-f]{40}", revision)  # MJHQ-30K, Janus-Pro-1B: full commit hashes
    assert all(d.get("revision") is None for d in resources["datasets"])  # no public record found: a user pins
    assert all(PAPER["showo"][part]["revision"] is None for part in ("model", "tokenizer", "text_tokenizer"))
    assert sum(d["database_images"] for d in resources["datasets"]) == 5_700_000 + 3_300_000 + 4_600_000
    assert sum(d["finetune_images"] for d in resources["datasets"]) == 50_000


# ---------------------------------------------------------------- GitHub benchmarks
def test_geneval_from_a_pinned_github_archive(tmp_path, shared_benchmarks, no_network):
    spec = RepoSpec.from_config(PAPER["resources"]["benchmarks"]["geneval"], "resources.benchmarks.geneval")
    files = {f"prompts/{n}": (shared_benchmarks / "geneval" / n).read_bytes()
             for n in ("evaluation_metadata.jsonl", "object_names.txt")}
    files["README.md"] = b"not requested\n"
    github_tarball(tmp_path / "cache", spec.repo, spec.revision, files)
    out = tmp_path / "resources" / "benchmarks" / "geneval"
    manifest = fetch_benchmark(spec, out, tmp_path / "cache")
    assert sorted(p.name for p in out.iterdir()) == ["evaluation_metadata.jsonl", "manifest.json", "object_names.txt"]
    assert (out / "evaluation_metadata.jsonl").read_bytes() == files["prompts/evaluation_metadata.jsonl"]
    recorded = json.loads((out / "manifest.json").read_text())["sources"]
    assert recorded == manifest.sources
    entry = recorded["evaluation_metadata.jsonl"]
    assert entry["revision"] == spec.revision and entry["repo"] == "djghosh13/geneval"
    assert entry["files"]["evaluation_metadata.jsonl"]["sha256"] == hashlib.sha256(
        files["prompts/evaluation_metadata.jsonl"]).hexdigest()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_dpg_prompts_folder_from_a_github_archive(tmp_path, shared_benchmarks, no_network):
    entry = PAPER["resources"]["benchmarks"]["dpg_bench"]
    csv_bytes = b"item_id,text\n0,a\n"
    entry = {**entry, "files": [entry["files"][0], {**entry["files"][1], "git_oid": None}]}  # the CSV is not here
    spec = RepoSpec.from_config(entry, "resources.benchmarks.dpg_bench")
    files = {f"dpg_bench/prompts/{p.name}": p.read_bytes() for p in (shared_benchmarks / "dpg_bench/prompts").iterdir()}
    files["dpg_bench/dpg_bench.csv"] = csv_bytes
    github_tarball(tmp_path / "cache", spec.repo, spec.revision, files)
    out = tmp_path / "dpg_bench"
    fetch_benchmark(spec, out, tmp_path / "cache")
    assert len(list((out / "prompts").glob("*.txt"))) == 1065
    assert (out / "dpg_bench.csv").read_bytes() == csv_bytes
    files_recorded = json.loads((out / "manifest.json").read_text())["sources"]["prompts"]["files"]
    assert len(files_recorded) == 1065 and "prompts/0.txt" in files_recorded


def test_a_file_that_does_not_match_its_pin_is_refused_and_nothing_is_written(tmp_path, no_network):
    entry = {"host": "github", "repo": "o/r", "revision": COMMIT,
             "files": [{"path": "a.txt", "to": "a.txt", "git_oid": "0" * 40}]}
    github_tarball(tmp_path / "cache", "o/r", COMMIT, {"a.txt": b"changed upstream\n"})
    with pytest.raises(FetchError, match=r"o/r/a.txt@0123.*does not match the pinned 0{40}"):
        fetch_benchmark(RepoSpec.from_config(entry, "resources.benchmarks.r"), tmp_path / "out", tmp_path / "cache")
    assert not (tmp_path / "out" / "a.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no staging folder left either


def test_a_killed_archive_download_leaves_no_partial_file(tmp_path, monkeypatch):
    class Broken(io.BytesIO):
        def read(self, *args):
            raise OSError("connection reset")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: Broken())
    with pytest.raises(FetchError, match="cannot download https://codeload.github.com/o/r/tar.gz/"):
        github_archive("o/r", COMMIT, tmp_path)
    assert not list((tmp_path / "github").iterdir())
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: io.BytesIO(b"archive"))
    assert github_archive("o/r", COMMIT, tmp_path).read_bytes() == b"archive"


# ---------------------------------------------------------------- Hugging Face
def mjhq_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("animals/a1.jpg", b"jpeg-1")
        zipped.writestr("people/p1.jpg", b"jpeg-2")
    return buffer.getvalue()


def test_mjhq_from_the_hub_with_its_zip_extracted(tmp_path, hub):
    hub.add("playgroundai/MJHQ-30K", {"meta_data.json": b'{"a1": {}}', "mjhq30k_imgs.zip": mjhq_zip()})
    entry = {**PAPER["resources"]["benchmarks"]["mjhq"], "revision": COMMIT}
    fetch_benchmark(RepoSpec.from_config(entry, "resources.benchmarks.mjhq"), tmp_path / "mjhq", tmp_path / "cache")
    assert (tmp_path / "mjhq" / "images" / "people" / "p1.jpg").read_bytes() == b"jpeg-2"
    manifest = json.loads((tmp_path / "mjhq" / "manifest.json").read_text())["sources"]
    assert sorted(manifest["images"]["files"]) == ["images/animals/a1.jpg", "images/people/p1.jpg"]
    assert manifest["meta_data.json"]["revision"] == COMMIT


def test_an_unpinned_revision_is_refused_with_the_commit_to_pin(tmp_path, hub):
    hub.add("deepseek-community/Janus-Pro-1B", {"config.json": b"{}"})
    with pytest.raises(FetchError, match=f"backbone.revision is not pinned.*`backbone.revision: {COMMIT}`"):
        fetch_backbone("deepseek-community/Janus-Pro-1B", None, tmp_path / "backbone", tmp_path / "cache")
    assert not (tmp_path / "backbone").exists()
    manifest = fetch_backbone("deepseek-community/Janus-Pro-1B", None, tmp_path / "backbone", tmp_path / "cache",
                              allow_unpinned=True)
    assert manifest.sources["deepseek-community/Janus-Pro-1B"]["revision"] == COMMIT


def test_backbone_snapshot_is_verified_linked_and_restartable(tmp_path, hub):
    files = {"config.json": b"{}", "model-00001.safetensors": b"w" * 1000, "model-00002.safetensors": b"v" * 500}
    hub.add("deepseek-community/Janus-Pro-1B", files)
    hub.fail_after = 2  # killed after two files
    with pytest.raises(FetchError, match="connection reset"):
        fetch_backbone("deepseek-community/Janus-Pro-1B", COMMIT, tmp_path / "backbone", tmp_path / "cache")
    assert not (tmp_path / "backbone").exists()  # no partial output
    hub.fail_after = None
    manifest = fetch_backbone("deepseek-community/Janus-Pro-1B", COMMIT, tmp_path / "backbone", tmp_path / "cache")
    assert sorted(hub.downloads) == sorted(files)  # each file downloaded once: the rerun resumed from the cache
    for name, data in files.items():
        assert (tmp_path / "backbone" / name).read_bytes() == data
        assert manifest.sources["deepseek-community/Janus-Pro-1B"]["files"][name]["sha256"] == hashlib.sha256(
            data).hexdigest()
    assert (tmp_path / "backbone" / "manifest.json").is_file()


def test_a_corrupt_hub_download_is_detected_and_evicted(tmp_path, hub):
    hub.add("deepseek-community/Janus-Pro-1B", {"model.safetensors": b"weights"})
    hub.corrupt.add("model.safetensors")
    with pytest.raises(FetchError, match="sha256 .* does not match the hub's"):
        fetch_backbone("deepseek-community/Janus-Pro-1B", COMMIT, tmp_path / "backbone", tmp_path / "cache")
    hub.corrupt.clear()
    fetch_backbone("deepseek-community/Janus-Pro-1B", COMMIT, tmp_path / "backbone", tmp_path / "cache")
    assert (tmp_path / "backbone" / "model.safetensors").read_bytes() == b"weights"


def test_a_gated_dataset_says_how_to_get_access(tmp_path, hub):
    hub.add("JourneyDB/JourneyDB", {"data/train/imgs/000.tgz": b"x"})
    hub.gated.add("JourneyDB/JourneyDB")
    spec = DatasetSpec.from_config({"name": "journeydb", "repo": "JourneyDB/JourneyDB", "revision": COMMIT,
                                    "format": "webdataset", "database_images": 10}, "resources.datasets[1]")
    with pytest.raises(FetchError) as error:
        fetch_datasets([spec], "database", tmp_path / "database", tmp_path / "cache")
    message = str(error.value)
    assert "JourneyDB/JourneyDB is gated" in message
    assert "https://huggingface.co/datasets/JourneyDB/JourneyDB" in message and "HF_TOKEN" in message
    assert "no token is set" in message


def test_datasets_are_subsampled_by_whole_files_with_sources_for_the_patch_database(tmp_path, hub):
    shards = {f"cc12m-train-{i:04d}.tar": f"shard {i}".encode() for i in range(10)}
    hub.add("pixparse/cc12m-wds", {**shards, "README.md": b"card"})
    hub.add("brivangl/midjourney-v6-llava", {"data/train-0.parquet": b"p0", "data/train-1.parquet": b"p1"})
    local = tmp_path / "manual" / "datacomp"
    local.mkdir(parents=True)
    for i in range(4):
        (local / f"{i:05d}.tar").write_bytes(b"d%d" % i)
    entries = [
        {"name": "cc12m", "repo": "pixparse/cc12m-wds", "revision": COMMIT, "format": "webdataset",
         "patterns": ["*.tar"], "database_images": 5_700_000, "finetune_images": 25_000, "holdout": 0.1},
        {"name": "datacomp", "path": str(local), "format": "webdataset", "patterns": ["*.tar"],
         "database_images": 4_600_000},
        {"name": "midjourney_v6", "repo": "brivangl/midjourney-v6-llava", "revision": COMMIT, "format": "parquet",
         "patterns": ["*.parquet"], "finetune_images": 25_000, "caption_field": "llava"},
    ]
    specs = [DatasetSpec.from_config(e, f"resources.datasets[{i}]") for i, e in enumerate(entries)]
    sources = fetch_datasets(specs, "database", tmp_path / "database", tmp_path / "cache", subsample=0.25, seed=3)
    assert [s["name"] for s in sources] == ["pixparse/cc12m-wds", "datacomp"]
    assert sources[0] == {"name": "pixparse/cc12m-wds", "path": "cc12m", "format": "webdataset", "revision": COMMIT,
                          "image_column": "image", "id_column": "id", "caption_field": "", "holdout": 0.1,
                          "images": 1_425_000}
    fetched = sorted(p.name for p in (tmp_path / "database" / "cc12m").iterdir())
    assert fetched == choose_files(sorted(shards), 0.25, 3, "cc12m") and len(fetched) == 3  # ceil(0.25 * 10)
    assert len(list((tmp_path / "database" / "datacomp").iterdir())) == 1
    assert json.loads((tmp_path / "database" / "sources.json").read_text()) == sources
    manifest = json.loads((tmp_path / "database" / "manifest.json").read_text())["sources"]
    assert manifest["datacomp"]["revision"] is None and len(manifest["cc12m"]["files"]) == 3
    finetune = fetch_datasets(specs, "finetune", tmp_path / "finetune", tmp_path / "cache", subsample=0.25, seed=3)
    assert [(s["name"], s["images"]) for s in finetune] == [("pixparse/cc12m-wds", 6250),
                                                             ("brivangl/midjourney-v6-llava", 6250)]
    assert finetune[1]["caption_field"] == "llava"  # the split (arrag finetune-split) takes its captions there
    assert hub.downloads.count(fetched[0]) == 1  # both roles share the cache


def test_a_dataset_without_hub_images_says_how_to_prepare_it(tmp_path):
    spec = DatasetSpec.from_config({"name": "datacomp", "path": str(tmp_path / "missing"), "format": "webdataset",
                                    "patterns": ["*.tar"], "database_images": 1}, "resources.datasets[2]")
    with pytest.raises(FetchError, match=r"resources.datasets\[2\]: datacomp has no hub repository with images"):
        fetch_datasets([spec], "database", tmp_path / "database", tmp_path / "cache")


def test_a_snapshot_can_take_only_some_files(tmp_path, hub, capsys):
    files = {"config.json": b"{}", "tokenizer.json": b"t", "vocab.json": b"v", "model.safetensors": b"w" * 100}
    hub.add("microsoft/phi-1_5", files)
    assert cli.main(["fetch", "backbone", "--repo", "microsoft/phi-1_5", "--revision", COMMIT, "--include",
                     "tokenizer*", "vocab.json", "--out", str(tmp_path / "text"), "--cache", str(tmp_path / "c")]) == 0
    assert sorted(p.name for p in (tmp_path / "text").iterdir()) == ["manifest.json", "tokenizer.json", "vocab.json"]
    assert "model.safetensors" not in hub.downloads
    with pytest.raises(FetchError, match=r"showo: no file of microsoft/phi-1_5 at .* matches \['\*.model'\]"):
        fetch_backbone("microsoft/phi-1_5", COMMIT, tmp_path / "none", tmp_path / "c", key="showo", include=["*.model"])


def test_the_fetch_command_reports_errors_without_a_trace(tmp_path, hub, capsys):
    hub.add("deepseek-community/Janus-Pro-1B", {"config.json": b"{}"})
    code = cli.main(["fetch", "backbone", "--repo", "deepseek-community/Janus-Pro-1B", "--out",
                     str(tmp_path / "backbone"), "--cache", str(tmp_path / "cache")])
    assert code == 2
    assert "fetch failed: backbone.revision is not pinned" in capsys.readouterr().err
    code = cli.main(["fetch", "backbone", "--repo", "deepseek-community/Janus-Pro-1B", "--revision", COMMIT,
                     "--out", str(tmp_path / "backbone"), "--cache", str(tmp_path / "cache")])
    assert code == 0 and (tmp_path / "backbone" / "config.json").is_file()
