"""Loaders for the benchmark files, real or Shapes-world (same formats), and the prompt lists to generate.

- GenEval `evaluation_metadata.jsonl`: one JSON object per line with tag, include, optional exclude,
  prompt. Prompt id = zero-padded line index (GenEval's output folder name).
- DPG-Bench: `prompts/<id>.txt` (one prompt per file) and the question CSV.
- MJHQ-30K `meta_data.json`: {id: {"category": ..., "prompt": ...}}.
Every error names the file (and line or field) and what was expected.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
DPG_COLUMNS = ("item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
               "category_detailed", "tuple", "question_natural_language")


@dataclass(frozen=True)
class PromptItem:
    """One prompt to generate for: `id` names its output, `category` is MJHQ's (else None)."""

    id: str
    prompt: str
    category: str | None = None


def load_geneval_metadata(path: str | Path) -> list[dict]:
    path = Path(path)
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
            where = f"{path}:{number}"
            if row.get("tag") not in GENEVAL_TAGS:
                raise ValueError(f"{where}: tag {row.get('tag')!r} is not one of {', '.join(GENEVAL_TAGS)}")
            if not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise ValueError(f"{where}: missing 'prompt' string")
            for key in ("include", "exclude"):
                for obj in row.get(key, []):
                    if not isinstance(obj.get("class"), str) or not isinstance(obj.get("count"), int):
                        raise ValueError(f"{where}: every '{key}' entry needs a 'class' string and an int "
                                         f"'count', got {obj}")
            if not row.get("include"):
                raise ValueError(f"{where}: missing 'include' list")
            rows.append(row)
    return rows


def load_dpg_prompts(folder: str | Path) -> dict[str, str]:
    """{item_id: prompt} from `<folder>/<item_id>.txt`, sorted by id."""
    folder = Path(folder)
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no DPG-Bench prompt files (*.txt) in {folder}")
    return {f.stem: f.read_text(encoding="utf-8").strip() for f in files}


def load_dpg_questions(path: str | Path) -> dict[str, list[dict]]:
    """{item_id: rows in CSV order}; proposition_id becomes an int, dependency stays a string ("0", "1,2")."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in DPG_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing DPG-Bench columns {missing}; expected {', '.join(DPG_COLUMNS)}")
        questions: dict[str, list[dict]] = {}
        for number, row in enumerate(reader, start=2):
            try:
                row["proposition_id"] = int(row["proposition_id"])
            except ValueError as err:
                raise ValueError(f"{path}:{number}: proposition_id {row['proposition_id']!r} is not an int") from err
            questions.setdefault(row["item_id"], []).append(row)
    return questions


def check_plain_name(name: object, what: str, where: str) -> None:
    """A benchmark's id or category names an output file or folder: one plain path component, so that no entry
    can write outside the output folder ('../x', '/x') or over it ('', '.')."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise ValueError(f"{where}: {what} {name!r} is not a plain name (it names an output file: no '/', '\\', "
                         "'..' or empty names); fix the entry in this file")


def load_mjhq_meta(path: str | Path) -> dict[str, dict]:
    """{id: {"category", "prompt"}}; ids and categories must be plain names (`check_plain_name`)."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object {{id: {{category, prompt}}}}, got {type(meta).__name__}")
    for key, value in meta.items():
        if not isinstance(value, dict) or "prompt" not in value or "category" not in value:
            raise ValueError(f"{path}: entry {key!r} needs 'category' and 'prompt', got {value!r}")
        check_plain_name(key, "id", str(path))
        check_plain_name(value["category"], f"entry {key!r}: category", str(path))
    return meta


def prompt_items(benchmark: str, path: str | Path) -> list[PromptItem]:
    """The prompts to generate for a benchmark: `path` is GenEval's metadata jsonl, DPG's prompt
    folder, or MJHQ's meta_data.json."""
    if benchmark == "geneval":
        return [PromptItem(f"{i:05d}", row["prompt"]) for i, row in enumerate(load_geneval_metadata(path))]
    if benchmark == "dpg":
        return [PromptItem(key, text) for key, text in load_dpg_prompts(path).items()]
    if benchmark == "mjhq":
        return [PromptItem(key, v["prompt"], v["category"]) for key, v in load_mjhq_meta(path).items()]
    raise ValueError(f"unknown benchmark {benchmark!r}; allowed: geneval, dpg, mjhq")


def stratified_subset(items: list[PromptItem], size: int, seed: int) -> list[PromptItem]:
    """`size` of the MJHQ prompts `items`, stratified by category, in file order (the ablation subset).

    Each category gets size x its share of `items`, rounded down, and the prompts left over go to the categories
    with the largest remainders (ties: category name); within a category the prompts are a seeded random sample.
    So the subset has the reference set's category mix, which FID against all references needs. All items when
    `size` >= len(items).
    """
    if size >= len(items):
        return list(items)
    by_category: dict[str, list[str]] = {}
    for item in items:
        by_category.setdefault(item.category or "", []).append(item.id)
    shares = {c: size * len(ids) / len(items) for c, ids in sorted(by_category.items())}
    quota = {c: int(share) for c, share in shares.items()}
    for c in sorted(shares, key=lambda c: (-(shares[c] - quota[c]), c))[:size - sum(quota.values())]:
        quota[c] += 1
    chosen = set()
    for c, ids in by_category.items():
        sampler = random.Random(f"{seed}:{c}")  # noqa: S311 (a reproducible sample, not a secret)
        chosen.update(sampler.sample(ids, quota[c]))
    return [item for item in items if item.id in chosen]
