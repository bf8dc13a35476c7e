"""Data acquisition at paper scale: pinned downloads into resources/, verified, recorded, restartable.

Three kinds of resources (config `resources:` and `backbone:`; rules fetch_<benchmark>, fetch_backbone,
fetch_datasets):

- benchmark files from a GitHub repository at a pinned commit (GenEval metadata, DPG-Bench prompts and question
  CSV) or from a Hugging Face dataset at a pinned revision (MJHQ-30K metadata and reference images, a zip that
  is extracted);
- the backbone, a Hugging Face model snapshot at a pinned revision;
- image datasets for the patch database and the fine-tuning set (Hugging Face datasets, or a local copy
  prepared by hand where the hub has no images, e.g. DataComp's URL lists), subsampled by whole files.

Every download lands first in a cache under `resources/.cache/` that is not a workflow output (Hugging Face's
own cache, which resumes partial files, and one archive per GitHub commit), so a killed job loses nothing when
Snakemake deletes its incomplete outputs. Each file is verified before it is used: against its git object id
(GitHub files and folders, Hugging Face files stored in git) or its LFS sha256 (large Hugging Face files), as
published by the host for the pinned revision. Outputs are then built in a temporary sibling folder (hard links
into the cache, copies where links are impossible) and renamed into place, with a `manifest.json` that records
the repository, the resolved commit and the size and sha256 of every file.

A revision left null in the config is refused (the error names the config key and the hub's current commit)
unless `allow_unpinned` is set, in which case the current commit is used and recorded. A gated repository
(JourneyDB) or a missing token fails with what to do, not with an HTTP trace.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from evaluators.io import sha256_file, write_json_atomic

GITHUB_ARCHIVE = "https://codeload.github.com/{repo}/tar.gz/{commit}"
HUB_URL = {"model": "https://huggingface.co/{repo}", "dataset": "https://huggingface.co/datasets/{repo}"}
ROLES = ("database", "finetune")
FORMATS = ("folder", "parquet", "webdataset")


class FetchError(RuntimeError):
    """A download that cannot proceed, with what the user has to do about it."""


@dataclass(frozen=True)
class FileSpec:
    """One file or folder of a repository: `path` in the repository, `to` under the destination folder."""

    path: str
    to: str
    git_oid: str | None = None  # git object id (blob of a file, tree of a folder) at the pinned commit
    folder: bool = False  # `path` is a folder (GitHub) or, with `extract`, `to` is
    extract: bool = False  # a zip archive, extracted into the folder `to`


@dataclass(frozen=True)
class RepoSpec:
    """Files of one repository at one revision: a benchmark's files."""

    host: str  # "github" or "huggingface" (a dataset repository)
    repo: str
    revision: str | None
    files: tuple[FileSpec, ...]
    key: str = ""  # config key, named in errors

    @classmethod
    def from_config(cls, entry: dict, key: str) -> RepoSpec:
        files = tuple(FileSpec(**f) for f in entry["files"])
        return cls(entry["host"], entry["repo"], entry.get("revision"), files, key)


@dataclass(frozen=True)
class DatasetSpec:
    """An image dataset of the patch database and/or the fine-tuning set (paper §4 and Appendix B.3)."""

    name: str
    format: str  # how the patch database reads it: folder, parquet or webdataset (arrag.patchdb.sources)
    repo: str | None = None  # Hugging Face dataset id; None: a local copy at `path`, prepared by hand
    revision: str | None = None
    patterns: tuple[str, ...] = ("*",)  # files of the repository (or of `path`) that hold the images
    path: str | None = None
    database_images: int = 0  # images the paper samples from it for the patch database (§4)
    finetune_images: int = 0  # image-caption pairs for fine-tuning (Appendix B.3)
    holdout: float = 0.0  # fraction kept out of the database (fine-tuning images come from it)
    image_column: str = "image"
    id_column: str = "id"
    caption_field: str = ""  # where a fine-tuning pair's caption is (arrag.patchdb.sources.ImageSource)
    key: str = ""

    @classmethod
    def from_config(cls, entry: dict, key: str) -> DatasetSpec:
        values = {**entry, "patterns": tuple(entry.get("patterns", ("*",)))}
        spec = cls(**values, key=key)
        if spec.format not in FORMATS:
            raise FetchError(f"{key}.format: {spec.format!r} is not one of {FORMATS}")
        if spec.repo is None and not spec.path:
            raise FetchError(f"{key}: a dataset without a hub repository needs a local `path`")
        return spec

    def images(self, role: str) -> int:
        return self.database_images if role == "database" else self.finetune_images


@dataclass
class Manifest:
    """What a fetch produced: per source, its repository, resolved revision and every file's size and sha256."""

    sources: dict[str, dict] = field(default_factory=dict)

    def add(self, name: str, repo: str | None, revision: str | None, files: dict[str, Path],
            known_sha256: dict[str, str | None] | None = None) -> None:
        """Record `files` (path in the output -> file); sha256 values already computed may be passed in."""
        known = known_sha256 or {}
        self.sources[name] = {"repo": repo, "revision": revision,
                              "files": {rel: {"size": p.stat().st_size, "sha256": known.get(rel) or sha256_file(p)}
                                        for rel, p in sorted(files.items())}}

    def write(self, path: Path) -> None:
        write_json_atomic(path, {"sources": self.sources})


# ---------------------------------------------------------------- checksums
def git_blob_oid(path: str | Path) -> str:
    """The git object id of a file's content (`git hash-object`)."""
    size = os.path.getsize(path)
    digest = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_tree_oid(folder: str | Path) -> str:
    """The git object id of a folder of regular files and folders (`git write-tree` of its content)."""
    entries = []
    for child in Path(folder).iterdir():
        if child.is_dir():
            entries.append((child.name + "/", b"40000 " + child.name.encode(), git_tree_oid(child)))
        else:
            mode = b"100755 " if child.stat().st_mode & 0o111 else b"100644 "
            entries.append((child.name, mode + child.name.encode(), git_blob_oid(child)))
    body = b"".join(head + b"\0" + bytes.fromhex(oid) for _, head, oid in sorted(entries))
    return hashlib.sha1(b"tree %d\0" % len(body) + body, usedforsecurity=False).hexdigest()


def git_oid(path: Path) -> str:
    return git_tree_oid(path) if path.is_dir() else git_blob_oid(path)


def files_under(root: Path, prefix: str = "") -> dict[str, Path]:
    """Every regular file under the folder `root` by `prefix` + its path relative to it; a file: {prefix: root}."""
    if root.is_file():
        return {prefix or root.name: root}
    lead = f"{prefix}/" if prefix else ""
    return {lead + p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- atomic outputs
def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link `source` (resolved) to `target`, or copy it where links are impossible (other filesystem).
    A linked output shares its bytes with the cache: read it, never modify it in place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    source = source.resolve()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@contextmanager
def scratch(parent: Path, name: str) -> Iterator[Path]:
    """A temporary folder in `parent` (same filesystem as the outputs), removed when the block ends."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace(source: Path, target: Path) -> None:
    """Rename `source` (file or folder) to `target`, replacing what is there."""
    if target.is_dir():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)


# ---------------------------------------------------------------- GitHub
def github_archive(repo: str, commit: str, cache: Path) -> Path:
    """The source archive of `repo` at `commit`, downloaded once into the cache (via a temporary file)."""
    target = cache / "github" / f"{repo.replace('/', '+')}-{commit}.tar.gz"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    url = GITHUB_ARCHIVE.format(repo=repo, commit=commit)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle, urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310
            shutil.copyfileobj(response, handle)
        os.replace(tmp, target)
    except OSError as err:
        raise FetchError(f"cannot download {url}: {err}") from err
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def extract_from_archive(archive: Path, spec: FileSpec, staging: Path) -> Path:
    """Extract the file or folder `spec.path` of a GitHub archive (top folder `<name>-<commit>/`) to `spec.to`."""
    target = staging / spec.to
    found = False
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            inner = PurePosixPath(*parts[1:]) if len(parts) > 1 else None
            if inner is None or not member.isfile():
                continue
            if inner.as_posix() == spec.path:
                destination = target
            elif inner.is_relative_to(spec.path):
                destination = target / inner.relative_to(spec.path)
            else:
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as source, open(destination, "wb") as handle:
                shutil.copyfileobj(source, handle)
            if member.mode & 0o111:
                destination.chmod(0o755)
            found = True
    if not found:
        raise FetchError(f"{spec.path} is not in {archive.name}")
    return target


# ---------------------------------------------------------------- Hugging Face
@contextmanager
def hub_errors(repo: str, repo_type: str, key: str) -> Iterator[None]:
    """Turn the hub's errors into FetchErrors that say what to do."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = HUB_URL[repo_type].format(repo=repo)
    token = "a token is set" if get_token() else "no token is set (HF_TOKEN or `hf auth login`)"
    try:
        yield
    except GatedRepoError as err:
        raise FetchError(f"{repo} is gated: accept its licence / access conditions at {url} with your Hugging Face "
                         f"account, then make its token available (HF_TOKEN or `hf auth login`); {token}") from err
    except RepositoryNotFoundError as err:
        raise FetchError(f"{repo} ({key}): repository not found, or it needs authentication: {token}; "
                         f"check {url}") from err
    except RevisionNotFoundError as err:
        raise FetchError(f"{key}.revision: not a revision of {repo} ({err})") from err
    except EntryNotFoundError as err:
        raise FetchError(f"{key}: file not found in {repo} at the pinned revision ({err})") from err
    except LocalEntryNotFoundError as err:
        raise FetchError(f"cannot reach the Hugging Face Hub for {repo} and the file is not cached: {err}") from err
    except HfHubHTTPError as err:
        raise FetchError(f"{repo} ({key}): {err}") from err
    except OSError as err:  # network failures: what was downloaded stays in the cache
        raise FetchError(f"{repo} ({key}): download interrupted ({err}); run again to resume") from err


def resolve_revision(repo: str, repo_type: str, revision: str | None, key: str, allow_unpinned: bool) -> str:
    """The commit to download: the pinned one (checked to exist), or the current one if unpinned is allowed."""
    from huggingface_hub import HfApi

    with hub_errors(repo, repo_type, key):
        commit = HfApi().repo_info(repo, repo_type=repo_type, revision=revision).sha
    if revision is None and not allow_unpinned:
        raise FetchError(f"{key}.revision is not pinned. The current commit of {repo} is {commit}: set "
                         f"`{key}.revision: {commit}` in the config (or resources.allow_unpinned: true to download "
                         "the current commit and record it in the manifest)")
    return commit


def hub_listing(repo: str, repo_type: str, commit: str, key: str) -> dict[str, object]:
    """Every file of the repository at `commit`: path -> the hub's RepoFile (size, git blob id, LFS sha256)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    with hub_errors(repo, repo_type, key):
        entries = HfApi().list_repo_tree(repo, recursive=True, revision=commit, repo_type=repo_type)
        return {e.path: e for e in entries if isinstance(e, RepoFile)}


def hub_file(repo: str, repo_type: str, commit: str, entry, cache: Path, key: str) -> tuple[Path, str | None]:
    """One file from the hub cache (downloaded or resumed there), verified against the hub's checksum;
    returns its path and, for LFS files, the sha256 computed on the way."""
    from huggingface_hub import hf_hub_download

    with hub_errors(repo, repo_type, key):
        path = Path(hf_hub_download(repo, entry.path, repo_type=repo_type, revision=commit,
                                    cache_dir=cache / "huggingface"))
    if entry.lfs is not None:
        expected, actual, kind = entry.lfs.sha256, sha256_file(path), "sha256"
    else:
        expected, actual, kind = entry.blob_id, git_blob_oid(path), "git blob id"
    if actual != expected:
        path.resolve().unlink(missing_ok=True)
        raise FetchError(f"{repo}/{entry.path}@{commit}: {kind} {actual} does not match the hub's {expected} "
                         "(corrupt download, removed from the cache: run again)")
    return path, actual if kind == "sha256" else None


def check_oid(path: Path, expected: str | None, where: str) -> None:
    if expected is None:
        return
    actual = git_oid(path)
    if actual != expected:
        raise FetchError(f"{where}: git object id {actual} does not match the pinned {expected}")


def extract_zip(archive: Path, target: Path) -> None:
    """Extract a zip into `target`, refusing members that would land outside it."""
    with zipfile.ZipFile(archive) as zipped:
        for member in zipped.infolist():
            destination = (target / member.filename).resolve()
            if not destination.is_relative_to(target.resolve()):
                raise FetchError(f"{archive.name}: member {member.filename!r} points outside the folder")
        zipped.extractall(target)  # noqa: S202 (members checked above)


# ---------------------------------------------------------------- the three kinds of resources
def fetch_benchmark(spec: RepoSpec, out: str | Path, cache: str | Path, allow_unpinned: bool = False) -> Manifest:
    """The benchmark's files into `out` (each `to` of `spec.files`, renamed into place), then `out/manifest.json`."""
    out, cache = Path(out), Path(cache)
    manifest = Manifest()
    with scratch(out.parent, out.name) as staging:
        produced: dict[str, Path] = {}
        if spec.host == "github":
            if spec.revision is None:
                raise FetchError(f"{spec.key}.revision: a GitHub source needs a pinned commit")
            commit = spec.revision
            archive = github_archive(spec.repo, commit, cache)
            for file in spec.files:
                produced[file.to] = extract_from_archive(archive, file, staging)
                if produced[file.to].is_dir() != file.folder:
                    raise FetchError(f"{spec.key}: {file.path} is a {'folder' if file.folder else 'file'} in the "
                                     "config but not in the repository")
                check_oid(produced[file.to], file.git_oid, f"{spec.repo}/{file.path}@{commit}")
        else:
            commit = resolve_revision(spec.repo, "dataset", spec.revision, spec.key, allow_unpinned)
            listing = hub_listing(spec.repo, "dataset", commit, spec.key)
            for file in spec.files:
                if file.path not in listing:
                    raise FetchError(f"{spec.key}: {file.path} is not in {spec.repo} at {commit}")
                source, _ = hub_file(spec.repo, "dataset", commit, listing[file.path], cache, spec.key)
                produced[file.to] = staging / file.to
                if file.extract != file.folder:
                    raise FetchError(f"{spec.key}: {file.path}: a hub file is extracted into a folder exactly when "
                                     "`extract` and `folder` are both true")
                if file.extract:
                    extract_zip(source, produced[file.to])
                else:
                    link_or_copy(source, produced[file.to])
        for file in spec.files:
            manifest.add(file.to, spec.repo, commit, files_under(produced[file.to], file.to))
        for file in spec.files:
            replace(produced[file.to], out / file.to)
        manifest.write(out / "manifest.json")
    return manifest


def fetch_backbone(repo: str, revision: str | None, out: str | Path, cache: str | Path,
                   allow_unpinned: bool = False, key: str = "backbone", include: list[str] | None = None) -> Manifest:
    """A model snapshot (every file of the repository, or those matching a glob of `include`) into the folder
    `out`, with `out/manifest.json`."""
    out, cache = Path(out), Path(cache)
    commit = resolve_revision(repo, "model", revision, key, allow_unpinned)
    listing = hub_listing(repo, "model", commit, key)
    if include:
        listing = {path: entry for path, entry in listing.items() if any(fnmatch(path, p) for p in include)}
        if not listing:
            raise FetchError(f"{key}: no file of {repo} at {commit} matches {include}")
    manifest = Manifest()
    with scratch(out.parent, out.name) as staging:
        files, known = {}, {}
        for path, entry in sorted(listing.items()):
            source, known[path] = hub_file(repo, "model", commit, entry, cache, key)
            files[path] = staging / path
            link_or_copy(source, files[path])
        manifest.add(repo, repo, commit, files, known)
        manifest.write(staging / "manifest.json")
        replace(staging, out)
    return manifest


def choose_files(paths: list[str], fraction: float, seed: int, name: str) -> list[str]:
    """A reproducible random subset of ceil(fraction * n) files (whole files: shards of images), sorted."""
    ranked = sorted(paths, key=lambda p: hashlib.sha256(f"{seed}\0{name}\0{p}".encode()).hexdigest())
    return sorted(ranked[:math.ceil(fraction * len(paths))])


def fetch_datasets(specs: list[DatasetSpec], role: str, out: str | Path, cache: str | Path, subsample: float = 1.0,
                   seed: int = 0, allow_unpinned: bool = False) -> list[dict]:
    """The datasets of one role ("database" or "finetune") into `out/<name>/`, with `out/sources.json` (one
    `arrag.patchdb.sources.ImageSource` per dataset; paths relative to `out`) and `out/manifest.json`.

    `subsample` scales the paper's image counts and the number of files downloaded per dataset."""
    if role not in ROLES:
        raise FetchError(f"role must be one of {ROLES}, got {role!r}")
    out, cache = Path(out), Path(cache)
    used = [s for s in specs if s.images(role) > 0]
    if not used:
        raise FetchError(f"no dataset of resources.datasets has {role}_images > 0")
    manifest, sources = Manifest(), []
    with scratch(out.parent, out.name) as staging:
        for spec in used:
            known: dict[str, str | None] = {}
            if spec.repo is None:
                commit, files = None, local_files(spec, subsample, seed)
            else:
                commit = resolve_revision(spec.repo, "dataset", spec.revision, spec.key, allow_unpinned)
                listing = hub_listing(spec.repo, "dataset", commit, spec.key)
                chosen = choose_files([p for p in listing if any(fnmatch(p, pat) for pat in spec.patterns)],
                                      subsample, seed, spec.name)
                if not chosen:
                    raise FetchError(f"{spec.key}.patterns {list(spec.patterns)} match no file of {spec.repo}")
                files = {}
                for rel in chosen:
                    files[rel], known[f"{spec.name}/{rel}"] = hub_file(spec.repo, "dataset", commit, listing[rel],
                                                                       cache, spec.key)
            linked = {}
            for rel, source in files.items():
                linked[f"{spec.name}/{rel}"] = staging / spec.name / rel
                link_or_copy(source, linked[f"{spec.name}/{rel}"])
            manifest.add(spec.name, spec.repo, commit, linked, known)
            sources.append({"name": spec.repo or spec.name, "path": spec.name, "format": spec.format,
                            "revision": commit or "", "image_column": spec.image_column,
                            "id_column": spec.id_column, "caption_field": spec.caption_field,
                            "holdout": spec.holdout,
                            "images": round(spec.images(role) * subsample)})
        write_json_atomic(staging / "sources.json", sources)
        manifest.write(staging / "manifest.json")
        replace(staging, out)
    return sources


def local_files(spec: DatasetSpec, subsample: float, seed: int) -> dict[str, Path]:
    """The files of a dataset prepared by hand (e.g. DataComp downloaded with img2dataset), subsampled."""
    root = Path(spec.path)
    if not root.is_dir():
        raise FetchError(f"{spec.key}: {spec.name} has no hub repository with images; prepare it by hand in "
                         f"{root} ({spec.format} files matching {list(spec.patterns)}), see the README's "
                         "'Data acquisition' section, then run again")
    available = {rel: p for rel, p in files_under(root).items() if any(fnmatch(rel, pat) for pat in spec.patterns)}
    if not available:
        raise FetchError(f"{spec.key}: no file under {root} matches {list(spec.patterns)}")
    return {rel: available[rel] for rel in choose_files(sorted(available), subsample, seed, spec.name)}
