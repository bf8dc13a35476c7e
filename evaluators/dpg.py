"""DPG-Bench scoring with the official rules (TencentQQGYLab/ELLA, dpg_bench/compute_dpg_bench.py), on
a generated folder holding one image per prompt, `<item_id>.png`, a 2x2 grid of 4 samples.

Official scoring, as read in that script:
- the image is cut into the crops (0, 0, R, R), (R, 0, 2R, R), (0, R, R, 2R), (R, R, 2R, 2R) with R the
  `--resolution` argument (here: default half the image width), the first `--pic-num` of them (the
  script's default is 1, its launcher dist_eval.sh passes 4; here 4);
- every question of the prompt is asked of every crop; it scores 1 when the answer is exactly "yes";
- one pass over the questions in CSV order: a question scores 0 when any non-zero parent in its
  `dependency` list currently scores 0 (a parent later in the CSV still holds its raw answer);
- crop score = mean over questions; image score = mean over crops; DPG-Bench = mean over images x 100;
- categories: L2 = the `tuple` column before "(" ("entity - whole", "global -"), L1 = L2 before "-";
  a category's score is the mean of its question scores pooled over images, x 100.

`official_quirks` reproduces what the script does beyond that (verified in the source):
- it skips the first data row of the CSV (`if i == 0: continue` after pandas has read the header), so
  the first prompt loses its first question; when another question of that prompt depends on it the
  parent lookup raises KeyError, the script prints "Failed filename" and leaves that image out of every
  score (here: listed under "failed");
- its category scores come from the answers of the last crop only, before dependency zeroing
  (`qid2scores_orig` is copied inside the crop loop before the zeroing pass and returned after it);
- an image whose name matches no prompt is skipped the same way (here an error without the switch).
Without the switch, every question is used, category scores pool the zeroed scores of every crop,
and a dependency on a missing question or an image without questions is an error. Either way the record also holds
the other mode's scores (`other_mode`), from the same answers (each image is asked the questions of both modes),
so a table can be compared with published DPG-Bench numbers, which come from the official script.

VQA backends: `mplug` (modelscope mPLUG-large, the official model; workflow/envs/dpg.yaml), `transformers`
(a transformers VQA model, e.g. BLIP, from a hub id or local path) and `shapes` (answers from the
Shapes-world detector; `--validate-shapes TRUTH_DIR` checks it on the benchmark's truth renders).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from evaluators.geneval import default_device, relative_position, results_path
from evaluators.io import file_list_hash, list_images, load_rgb, sha256_file, write_bytes_atomic
from evaluators.shapes_detector import ShapesDetector, Vocabulary, load_vocabulary

QUESTION_COLUMNS = (
    "item_id",
    "text",
    "keywords",
    "proposition_id",
    "dependency",
    "category_broad",
    "category_detailed",
    "tuple",
    "question_natural_language",
)
MPLUG_MODEL = "damo/mplug_visual-question-answering_coco_large_en"


@dataclass(frozen=True)
class DpgSettings:
    official_quirks: bool = False
    resolution: int | None = None  # side of one grid cell in pixels; None: half the image width
    pic_num: int = 4  # crops used, in the order top-left, top-right, bottom-left, bottom-right


class MissingParentError(ValueError):
    """A question depends on a proposition id that is not a question of its prompt."""


def parse_dependency(text: str) -> list[int]:
    """Parent proposition ids of a `dependency` cell: "0" -> [0], "1,2" -> [1, 2] (0 means none)."""
    return [int(part.strip()) for part in str(text).split(",")]


def load_questions(path: str | Path, official_quirks: bool = False) -> dict[str, list[dict]]:
    """{item_id: CSV rows of that prompt in CSV order}, proposition_id as int. With `official_quirks`
    the first data row is dropped, as the official script does."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in QUESTION_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing DPG-Bench columns {missing}")
        rows = list(reader)
    questions: dict[str, list[dict]] = {}
    for number, row in enumerate(rows[1:] if official_quirks else rows, start=3 if official_quirks else 2):
        try:
            row["proposition_id"] = int(row["proposition_id"])
            parse_dependency(row["dependency"])
        except ValueError as err:
            raise ValueError(f"{path}:{number}: bad proposition_id or dependency ({err})") from err
        questions.setdefault(row["item_id"], []).append(row)
    if not official_quirks:
        for item_id, rows_of_item in questions.items():
            ids = {r["proposition_id"] for r in rows_of_item}
            for r in rows_of_item:
                absent = [p for p in parse_dependency(r["dependency"]) if p and p not in ids]
                if absent:
                    raise ValueError(
                        f"{path}: item {item_id} question {r['proposition_id']} depends on "
                        f"{absent}, which are not questions of that item"
                    )
    return questions


def dependency_scores(questions: list[dict], answers: dict[int, bool]) -> dict[int, float]:
    """Question scores of one crop after the official zeroing pass: raw score = answer is yes; then in
    CSV order a question becomes 0 when any non-zero parent currently scores 0."""
    scores = {q["proposition_id"]: float(answers[q["proposition_id"]]) for q in questions}
    for question in questions:
        for parent in parse_dependency(question["dependency"]):
            if parent == 0:
                continue
            if parent not in scores:
                raise MissingParentError(
                    f"question {question['proposition_id']} depends on {parent}, "
                    "which is not a question of this prompt"
                )
            if scores[parent] == 0:
                scores[question["proposition_id"]] = 0.0
                break
    return scores


def score_prompt(questions: list[dict], answers: dict[int, bool]) -> float:
    """Score of one crop in [0, 1]: `questions` are one prompt's CSV rows in CSV order (int
    "proposition_id", "dependency" like "0" or "1,2"), `answers` maps proposition id to yes (True)."""
    scores = dependency_scores(questions, answers)
    return sum(scores.values()) / len(scores)


def categories(question: dict) -> tuple[str, str]:
    """(L1, L2) category of a question, from its `tuple` as the official script: "entity - whole (cat)"
    -> ("entity", "entity - whole")."""
    level2 = question["tuple"].split("(")[0].strip()
    return level2.split("-")[0].strip(), level2


def grid_crops(image: Image.Image, resolution: int | None, pic_num: int) -> list[Image.Image]:
    """The first `pic_num` cells of a 2x2 grid with cells `resolution` pixels wide (None: half the width)."""
    cell = resolution or image.width // 2
    if image.width < 2 * cell or image.height < 2 * cell:
        raise ValueError(f"a {image.width}x{image.height} image cannot hold a 2x2 grid of {cell}-pixel cells")
    boxes = [
        (0, 0, cell, cell),
        (cell, 0, 2 * cell, cell),
        (0, cell, cell, 2 * cell),
        (cell, cell, 2 * cell, 2 * cell),
    ]
    return [image.crop(box) for box in boxes[:pic_num]]


def score_image(
    questions: list[dict], crop_answers: list[dict[int, bool]], official_quirks: bool = False
) -> tuple[float, list[float], dict[int, float]]:
    """(image score, crop scores, per-question scores for the category tables) from the answers of
    each crop. Category scores: mean over crops of the zeroed scores, or with `official_quirks` the last
    crop's raw answers."""
    crop_scores, zeroed = [], []
    for answers in crop_answers:
        scores = dependency_scores(questions, answers)
        zeroed.append(scores)
        crop_scores.append(sum(scores.values()) / len(scores))
    if official_quirks:
        per_question = {q["proposition_id"]: float(crop_answers[-1][q["proposition_id"]]) for q in questions}
    else:
        per_question = {qid: float(np.mean([s[qid] for s in zeroed])) for qid in zeroed[0]}
    return float(np.mean(crop_scores)), crop_scores, per_question


def summarize(image_scores: list[float], category_scores: list[tuple[str, str, float]]) -> dict:
    """DPG-Bench score (mean image score) and L1/L2 category scores (mean of the pooled question
    scores of the category), all x 100; `category_scores` holds (L1, L2, score) per question per image."""
    if not image_scores:
        raise ValueError("no image could be scored")
    level1: dict[str, list[float]] = {}
    level2: dict[str, list[float]] = {}
    for l1, l2, score in category_scores:
        level1.setdefault(l1, []).append(score)
        level2.setdefault(l2, []).append(score)
    return {
        "dpg": float(np.mean(image_scores)) * 100,
        "dpg_l1": {k: float(np.mean(v)) * 100 for k, v in sorted(level1.items())},
        "dpg_l2": {k: float(np.mean(v)) * 100 for k, v in sorted(level2.items())},
    }


# ---------------------------------------------------------------- VQA backends


class ShapesVQA:
    """Answers the Shapes benchmark's questions from the Shapes detector's output:
    "Is there a circle?" / "Are there circles?" (at least one), "Are there three circles?" (exactly),
    "Is the circle red?" (the most confident circle) / "Are the circles red?" (all of them),
    "Is the circle to the left of the square?" (GenEval's position rule on the most confident of each),
    "Is the background light?" (nearest vocabulary background to the border colour).
    Detections count when their score exceeds `min_score`; an unknown question form is an error."""

    def __init__(self, vocabulary: Vocabulary, min_score: float = 0.3):
        self.vocabulary = vocabulary
        self.detector = ShapesDetector(vocabulary)
        self.min_score = min_score
        singular = "|".join(map(re.escape, vocabulary.classes))
        plural = "|".join(map(re.escape, vocabulary.plurals.values()))
        colors = "|".join(map(re.escape, vocabulary.colors))
        numbers = "|".join(map(re.escape, vocabulary.numbers.values()))
        phrases = "|".join(map(re.escape, vocabulary.relation_phrases.values()))
        backgrounds = "|".join(map(re.escape, vocabulary.backgrounds))
        self.patterns = {
            "exists": re.compile(rf"Is there an? (?P<noun>{singular})\?"),
            "exists_plural": re.compile(rf"Are there (?P<noun>{plural})\?"),
            "count": re.compile(rf"Are there (?P<number>{numbers}) (?P<noun>{plural})\?"),
            "color": re.compile(rf"Is the (?P<noun>{singular}) (?P<color>{colors})\?"),
            "color_plural": re.compile(rf"Are the (?P<noun>{plural}) (?P<color>{colors})\?"),
            "relation": re.compile(
                rf"Is the (?P<a>{singular}) (?P<phrase>{phrases}) the (?P<b>{singular})\?"
            ),
            "background": re.compile(rf"Is the background (?P<background>{backgrounds})\?"),
        }
        self.singular_of = {p: c for c, p in vocabulary.plurals.items()}
        self.number_of = {w: n for n, w in vocabulary.numbers.items()}
        self.relation_of = {p: r for r, p in vocabulary.relation_phrases.items()}

    def answer(self, image: Image.Image, questions: list[str]) -> list[str]:
        pixels = np.asarray(image.convert("RGB"))
        detections = [d for d in self.detector.detect(pixels) if d["score"] > self.min_score]
        background = self.detector.background(pixels)
        return ["yes" if self.holds(q, detections, background) else "no" for q in questions]

    def holds(self, question: str, detections: list[dict], background: str) -> bool:
        for kind, pattern in self.patterns.items():
            match = pattern.fullmatch(question.strip())
            if match:
                return self._holds(kind, match.groupdict(), detections, background)
        raise ValueError(f"the shapes VQA cannot parse the question {question!r}")

    def _holds(self, kind: str, parts: dict, detections: list[dict], background: str) -> bool:
        if kind == "background":
            return parts["background"] == background
        if kind == "relation":
            a = [d for d in detections if d["class"] == parts["a"]]
            b = [d for d in detections if d["class"] == parts["b"]]
            return bool(a and b) and self.relation_of[parts["phrase"]] in relative_position(
                a[0]["box"], b[0]["box"]
            )
        noun = self.singular_of.get(parts["noun"], parts["noun"])
        found = [d for d in detections if d["class"] == noun]
        if kind in ("exists", "exists_plural"):
            return bool(found)
        if kind == "count":
            return len(found) == self.number_of[parts["number"]]
        if kind == "color":
            return bool(found) and found[0]["color"] == parts["color"]
        return bool(found) and all(d["color"] == parts["color"] for d in found)


class MplugVQA:
    """The official VQA model: modelscope's mPLUG-large VQA pipeline (hub id or local folder)."""

    def __init__(self, model: str, device: str):
        from modelscope.pipelines import pipeline  # lazy: only in workflow/envs/dpg.yaml
        from modelscope.utils.constant import Tasks

        self.pipeline = pipeline(Tasks.visual_question_answering, model=model, device=device)

    def answer(self, image: Image.Image, questions: list[str]) -> list[str]:
        return [self.pipeline({"image": image, "question": q})["text"] for q in questions]


class TransformersVQA:
    """A transformers VQA model (AutoModelForVisualQuestionAnswering + AutoProcessor from a hub id or a
    local folder): generative models (BLIP) answer by greedy generation, classifiers (ViLT) by the
    arg-max label. All questions of a crop go in one batch."""

    def __init__(self, model: str, device: str, max_new_tokens: int = 10):
        from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model)
        self.model = AutoModelForVisualQuestionAnswering.from_pretrained(model).eval().to(device)
        self.device, self.max_new_tokens = device, max_new_tokens

    def answer(self, image: Image.Image, questions: list[str]) -> list[str]:
        import torch

        inputs = self.processor(
            images=[image] * len(questions), text=questions, return_tensors="pt", padding=True
        ).to(self.device)
        with torch.no_grad():
            if not self.model.can_generate():
                labels = self.model(**inputs).logits.argmax(dim=-1).tolist()
                return [self.model.config.id2label[i] for i in labels]
            tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]


# ---------------------------------------------------------------- folder scoring and CLI


def score_folder(
    gen_dir: Path, modes: dict[bool, dict[str, list[dict]]], vqa, settings: DpgSettings
) -> dict[bool, tuple[list[dict], list[dict]]]:
    """Per scoring mode (official quirks off: False, on: True), the (per-image results, failures) over the images
    of `gen_dir` named <item_id>.png/.jpg; `modes` maps each mode to its questions (`load_questions`). One set of
    answers serves every mode: each image is asked the questions of the mode that has the most of them (the
    corrected mode keeps the first CSV row, which the quirks drop). Only the mode of `settings` refuses an image
    without questions, and only when its quirks are off; otherwise such an image is a failure of that mode."""
    scored: dict[bool, tuple[list[dict], list[dict]]] = {mode: ([], []) for mode in modes}
    for path in tqdm(list_images(gen_dir), desc="dpg", unit="img", mininterval=2):
        item_id = path.stem
        rows = {mode: questions.get(item_id) for mode, questions in modes.items()}
        if rows[settings.official_quirks] is None and not settings.official_quirks:
            raise ValueError(f"{path}: no DPG-Bench questions for item {item_id!r}")
        asked = max((r for r in rows.values() if r is not None), key=len, default=None)
        crop_answers, crop_texts = [], []
        if asked is not None:
            texts = [r["question_natural_language"] for r in asked]
            for crop in grid_crops(load_rgb(path), settings.resolution, settings.pic_num):
                answers = vqa.answer(crop, texts)
                crop_texts.append(answers)
                crop_answers.append({r["proposition_id"]: a == "yes" for r, a in zip(asked, answers, strict=True)})
        for mode, mode_rows in rows.items():
            results, failures = scored[mode]
            if mode_rows is None:
                failures.append({"item_id": item_id, "error": "no questions for this item"})
                continue
            try:
                score, crop_scores, per_question = score_image(mode_rows, crop_answers, mode)
            except MissingParentError as err:  # only with official quirks (checked at load otherwise)
                failures.append({"item_id": item_id, "error": str(err)})
                continue
            results.append({
                "item_id": item_id,
                "filename": path.relative_to(gen_dir).as_posix(),
                "score": score,
                "crop_scores": crop_scores,
                "question_scores": per_question,
                "answers": crop_texts,  # per crop, in the order of the questions asked (CSV order)
            })
    return scored


def category_entries(results: list[dict], questions: dict[str, list[dict]]) -> list[tuple[str, str, float]]:
    entries = []
    for result in results:
        for row in questions[result["item_id"]]:
            entries.append((*categories(row), result["question_scores"][row["proposition_id"]]))
    return entries


def mode_summary(results: list[dict], failures: list[dict], questions: dict[str, list[dict]]) -> dict:
    """DPG-Bench score, category scores and failed images of one scoring mode."""
    summary = summarize([r["score"] for r in results], category_entries(results, questions)) if results else {}
    return {**summary, "failed": failures}


def validate_shapes_vqa(truth_dir: str | Path, questions: dict[str, list[dict]], vqa: ShapesVQA) -> dict:
    """Fraction of "yes" answers of the Shapes VQA on the truth renders (`truth_dir/images/<item_id>.png`,
    single images): every question of the Shapes benchmark is true of its truth render."""
    truth_dir = Path(truth_dir)
    wrong = []
    total = 0
    for item_id, rows in tqdm(
        sorted(questions.items()), desc="validate shapes vqa", unit="img", mininterval=2
    ):
        texts = [r["question_natural_language"] for r in rows]
        answers = vqa.answer(load_rgb(truth_dir / "images" / f"{item_id}.png"), texts)
        total += len(texts)
        wrong += [
            {"item_id": item_id, "question": t, "answer": a}
            for t, a in zip(texts, answers, strict=True)
            if a != "yes"
        ]
    return {
        "accuracy": 1 - len(wrong) / total if total else 0.0,
        "n_questions": total,
        "n_images": len(questions),
        "wrong": wrong,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gen_dir", nargs="?", type=Path, help="folder of <item_id>.png 2x2 grids")
    parser.add_argument("--questions", type=Path, required=True, help="dpg_bench.csv")
    parser.add_argument("--backend", choices=["shapes", "mplug", "transformers"], default="shapes")
    parser.add_argument("--vocabulary", type=Path, help="Shapes world vocabulary.json (shapes backend)")
    parser.add_argument(
        "--vqa-model",
        help=f"mplug: modelscope id or folder (default {MPLUG_MODEL}); "
        "transformers: hub id or folder (required)",
    )
    parser.add_argument(
        "--official-quirks",
        action="store_true",
        help="reproduce the official script's first-row drop and last-crop category scores",
    )
    parser.add_argument("--resolution", type=int, help="grid cell side in pixels (default: half the width)")
    parser.add_argument("--pic-num", type=int, default=4, choices=[1, 2, 3, 4], help="crops used (default 4)")
    parser.add_argument(
        "--results-jsonl",
        type=Path,
        help="per-image results (default: beside --out as <out stem>.results.jsonl)",
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--validate-shapes",
        type=Path,
        metavar="TRUTH_DIR",
        help="instead of scoring: answer every question on the truth renders (shapes backend)",
    )


def weight_hashes(model: str | None) -> dict[str, str]:
    """sha256 of the weights files (.safetensors, .bin, .pt, .pth) in a local model folder; {} for hub ids."""
    if not model or not Path(model).is_dir():
        return {}
    files = sorted(p for p in Path(model).rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    return {p.relative_to(model).as_posix(): sha256_file(p) for p in files}


def load_vqa(args: argparse.Namespace):
    if args.backend == "shapes":
        if not args.vocabulary:
            raise SystemExit("the shapes backend needs --vocabulary")
        return ShapesVQA(load_vocabulary(args.vocabulary))
    if args.backend == "mplug":
        return MplugVQA(args.vqa_model or MPLUG_MODEL, args.device or default_device())
    if not args.vqa_model:
        raise SystemExit("the transformers backend needs --vqa-model")
    return TransformersVQA(args.vqa_model, args.device or default_device())


def run(args: argparse.Namespace) -> dict:
    settings = DpgSettings(
        official_quirks=args.official_quirks, resolution=args.resolution, pic_num=args.pic_num
    )
    questions = load_questions(args.questions, settings.official_quirks)
    modes = {settings.official_quirks: questions}
    other = not settings.official_quirks
    try:
        modes[other] = load_questions(args.questions, other)
    except ValueError as err:  # the corrected mode refuses a dependency on a missing question
        other_error = str(err)
    inputs = {
        "questions_sha256": sha256_file(args.questions),
        "vocabulary_sha256": sha256_file(args.vocabulary)
        if args.backend == "shapes" and args.vocabulary
        else None,
    }
    if args.validate_shapes:
        if args.backend != "shapes":
            raise SystemExit("--validate-shapes checks the shapes backend")
        report = validate_shapes_vqa(args.validate_shapes, questions, load_vqa(args))
        return {
            "values": {f"shapes_vqa_{k}": v for k, v in report.items() if k != "n_images"},
            "n_images": report["n_images"],
            "settings": {"mode": "validate-shapes", "min_score": 0.3},
            "inputs": {**inputs, "truth_dir": str(args.validate_shapes)},
        }
    if args.gen_dir is None:
        raise SystemExit("give the generated folder GEN_DIR (or --validate-shapes TRUTH_DIR)")
    vqa = load_vqa(args)
    scored = score_folder(args.gen_dir, modes, vqa, settings)
    results, failures = scored[settings.official_quirks]
    out_path = results_path(args)
    if out_path:
        write_bytes_atomic(out_path, "".join(json.dumps(r) + "\n" for r in results).encode())
    files = list_images(args.gen_dir)
    return {
        "values": {
            **summarize([r["score"] for r in results], category_entries(results, questions)),
            "failed": failures,
            # the mode not selected, from the same answers: what a table of the other kind would show
            "other_mode": {"official_quirks": other, **(mode_summary(*scored[other], modes[other]) if other in scored
                                                        else {"error": other_error})},
            "results_jsonl": str(out_path) if out_path else None,
        },
        "n_images": {"images": len(files), "scored": len(results)},
        "settings": {
            **asdict(settings),
            "backend": args.backend,
            "vqa_model": args.vqa_model or (MPLUG_MODEL if args.backend == "mplug" else None),
            "yes_answer": "yes",
        },
        "inputs": {
            **inputs,
            "gen_dir": str(args.gen_dir),
            "gen_files_sha256": file_list_hash(files, args.gen_dir),
        },
        "weights_sha256": weight_hashes(args.vqa_model) if args.backend != "shapes" else {},
    }
