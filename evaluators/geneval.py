"""GenEval scoring with the official rules (djghosh13/geneval, evaluation/evaluate_images.py and
evaluation/summary_scores.py), on a generated folder in GenEval's layout:

    GEN_DIR/<index:05d>/metadata.jsonl        the prompt's line of evaluation_metadata.jsonl
    GEN_DIR/<index:05d>/samples/<k:04d>.png   the samples (other files, e.g. grid.png, are ignored)

Rules, as the official script:
- per class, detections sorted by score, kept when score > 0.3 (> 0.9 for the "counting" tag), at most
  16 per class, then NMS at IoU 1.0 (i.e. none; pixel-inclusive IoU as official);
- every `include` clause needs `count` objects of its class; colour and position are checked on the top
  `count` objects only; colour by CLIP zero-shot over the 10 official colours with 3 templates, on the
  object's mask composited on #999 and cropped to its box; position by the centre offset shrunk by
  0.1 x (dimA + dimB), normalised by the offset length, direction when a component exceeds 0.5;
- every `exclude` clause fails when `count` or more objects of its class were kept;
- the image is correct when no clause failed; reasons are joined by newlines;
- summary: mean correctness per tag (tags in first-appearance order), overall = mean of tag means.
Deterministic choices where the official code is not: ties in score keep detection order; relations in
a reason are listed in the order left of, right of, above, below (official: set order).

Backends: `shapes` (the Shapes-world detector, colour from pixels unless --clip-model is given) and
`mmdet` (the official Mask2Former Swin-S, colour by CLIP; run it in workflow/envs/geneval.yaml).
`--validate-shapes SPLIT_DIR` measures the Shapes detector against a split's annotations instead.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from evaluators.io import file_list_hash, load_rgb, sha256_file, write_bytes_atomic
from evaluators.shapes_detector import DetectorSettings, ShapesDetector, load_vocabulary, validate_detector

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
MASK_BACKGROUND = "#999"  # official `bgcolor` default: (153, 153, 153)
RELATIONS = ("left of", "right of", "above", "below")
MMDET_CONFIG = "mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py"
SAMPLE_NAME = re.compile(r"\d+\.png")

# (objects of one class, class name) -> one colour name per object
ColorClassifier = Callable[[list[dict], str], list[str]]


@dataclass(frozen=True)
class GenEvalSettings:
    """The official script's options (`--options threshold=... counting_threshold=...`) at their defaults."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    nms_threshold: float = 1.0  # official `max_overlap`; 1.0 keeps every box
    position_threshold: float = 0.1


def official_iou(box_a: list[float], box_b: list[float]) -> float:
    """Box IoU as the official `compute_iou`: pixel-inclusive areas (x2 - x1 + 1)."""

    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area(
        [max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])]
    )
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def select_detections(
    detections: list[dict], tag: str, settings: GenEvalSettings = GenEvalSettings()
) -> dict[str, list[dict]]:
    """The official selection: per class, sort by score (descending), keep score > threshold
    (counting_threshold for the "counting" tag), at most max_objects, then greedy NMS.
    Returns {class: [detection, ...]} in score order, classes with no kept detection omitted."""
    threshold = settings.counting_threshold if tag == "counting" else settings.threshold
    by_class: dict[str, list[dict]] = {}
    for det in detections:
        by_class.setdefault(det["class"], []).append(det)
    selected = {}
    for name, dets in by_class.items():
        ordered = [d for d in sorted(dets, key=lambda d: -d["score"]) if d["score"] > threshold]
        ordered = ordered[: settings.max_objects]
        kept = []
        while ordered:
            best = ordered.pop(0)
            kept.append(best)
            if settings.nms_threshold < 1:
                ordered = [d for d in ordered if official_iou(best["box"], d["box"]) < settings.nms_threshold]
        if kept:
            selected[name] = kept
    return selected


def relative_position(box_a: list[float], box_b: list[float], position_threshold: float = 0.1) -> set[str]:
    """Relations of box A to box B ([x1, y1, x2, y2], pixels) by the official rule: centre offset
    shrunk by position_threshold x (dimA + dimB) per axis, divided by the offset's length; a direction
    holds when its component exceeds 0.5. Empty when the shrunk offset vanishes."""
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - position_threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def object_colors(objects: list[dict], classname: str, classify_colors: ColorClassifier | None) -> list:
    """Each object's colour: its "color" when present, else the classifier's, else None."""
    colors = [obj.get("color") for obj in objects]
    missing = [i for i, c in enumerate(colors) if c is None]
    if missing and classify_colors is not None:
        for i, color in zip(missing, classify_colors([objects[i] for i in missing], classname), strict=True):
            colors[i] = color
    return colors


def color_failure(req: dict, found: list[dict], classify_colors: ColorClassifier | None) -> str | None:
    """The official colour check of one `include` clause on its top `count` objects: None when enough
    of them have the clause's colour, else the official reason."""
    colors = object_colors(found, req["class"], classify_colors)
    wanted = req["color"]
    if colors.count(wanted) >= req["count"]:
        return None
    names = list(COLORS) + sorted({c for c in colors if c is not None and c not in COLORS})
    found_colors = [f"{colors.count(c)} {c}" for c in names if c in colors]
    if None in colors:
        found_colors.append(f"{colors.count(None)} without colour (no colour classifier)")
    return (
        f"expected {wanted} {req['class']}>={req['count']}, found {colors.count(wanted)} {wanted}; and "
        + ", ".join(found_colors)
    )


def position_failure(req: dict, found: list[dict], targets: list[dict], threshold: float) -> str | None:
    """The official position check: every found object against every target object, stopping at the
    first pair without the expected relation (None when all pairs have it)."""
    expected = req["position"][0]
    for obj in found:
        for target in targets:
            relations = relative_position(obj["box"], target["box"], threshold)
            if expected not in relations:
                listed = " and ".join(r for r in RELATIONS if r in relations)
                return f"expected {req['class']} {expected} target, found {listed} target"
    return None


def clause_failure(
    req: dict,
    found: list[dict],
    matched_groups: list[list[dict] | None],
    classify_colors: ColorClassifier | None,
    settings: GenEvalSettings,
) -> str | None:
    """The official checks of one `include` clause on its top `count` objects, in order count, colour,
    position (against the objects of the clause it names, None when that clause failed); the first
    failure's reason, or None."""
    if len(found) < req["count"]:
        return f"expected {req['class']}>={req['count']}, found {len(found)}"
    if "color" in req:
        failure = color_failure(req, found, classify_colors)
        if failure:
            return failure
    if "position" in req:
        targets = matched_groups[req["position"][1]]
        if targets is None:
            return f"no target for {req['class']} to be {req['position'][0]}"
        return position_failure(req, found, targets, settings.position_threshold)
    return None


def evaluate(
    metadata: dict,
    objects: dict[str, list[dict]],
    classify_colors: ColorClassifier | None = None,
    settings: GenEvalSettings = GenEvalSettings(),
) -> tuple[bool, str]:
    """The official `evaluate`: `include` clauses (AND) then `exclude` clauses (OR) against the
    selected objects {class: detections in score order}; returns (correct, reasons joined by newlines)."""
    reasons = []
    matched_groups: list[list[dict] | None] = []
    for req in metadata.get("include", []):
        found = objects.get(req["class"], [])[: req["count"]]
        failure = clause_failure(req, found, matched_groups, classify_colors, settings)
        if failure:
            reasons.append(failure)
        matched_groups.append(None if failure else found)
    for req in metadata.get("exclude", []):
        kept = len(objects.get(req["class"], []))
        if kept >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {kept}")
    return not reasons, "\n".join(reasons)


def score_image(
    metadata: dict,
    detections: list[dict],
    classify_colors: ColorClassifier | None = None,
    settings: GenEvalSettings = GenEvalSettings(),
) -> tuple[bool, str]:
    """Score one image: `metadata` is one parsed line of evaluation_metadata.jsonl, `detections` the
    detector's raw output (dicts with "class", "score", "box" [x1, y1, x2, y2] pixels, optional "color"
    and "mask"). Applies the official selection, then the official rules. A detection's "color" is its
    colour; without one, `classify_colors` decides, and with neither the colour check fails."""
    return evaluate(
        metadata, select_detections(detections, metadata["tag"], settings), classify_colors, settings
    )


def summarize(results: list[dict]) -> dict:
    """The official summary of per-image results (dicts with "tag", "correct", "metadata"): accuracy per
    tag (first-appearance order), overall = mean of the tag accuracies, plus the fraction of correct
    images and of prompts with at least one correct image."""
    per_tag: dict[str, list[bool]] = {}
    per_prompt: dict[str, list[bool]] = {}
    for result in results:
        per_tag.setdefault(result["tag"], []).append(result["correct"])
        per_prompt.setdefault(result["metadata"], []).append(result["correct"])
    tag_scores = {tag: float(np.mean(values)) for tag, values in per_tag.items()}
    return {
        "geneval": float(np.mean(list(tag_scores.values()))),
        "geneval_per_tag": tag_scores,
        "geneval_tag_counts": {tag: {"correct": int(sum(v)), "total": len(v)} for tag, v in per_tag.items()},
        "correct_images": float(np.mean([r["correct"] for r in results])),
        "correct_prompts": float(np.mean([any(v) for v in per_prompt.values()])),
    }


# ---------------------------------------------------------------- CLIP colour classifier


def color_crop(image: Image.Image, box: list[float], mask: np.ndarray | None) -> Image.Image:
    """The official crop for colour classification: the object's mask composited on #999 (the whole
    image when there is no mask), cropped to its box (PIL rounds the box coordinates)."""
    image = image.convert("RGB")
    if mask is not None:
        blank = Image.new("RGB", image.size, color=MASK_BACKGROUND)
        image = Image.composite(image, blank, Image.fromarray(np.asarray(mask, dtype=bool)))
    return image.crop(tuple(box[:4]))


class ClipColorClassifier:
    """Zero-shot colour classification as the official script (clip_benchmark's zero_shot_classifier):
    per colour, the templates' text embeddings are L2-normalised, averaged and normalised again;
    a crop's colour is the argmax of 100 x normalised image embedding @ colour embeddings."""

    def __init__(
        self,
        model,
        preprocess,
        tokenizer,
        device: str,
        batch_size: int = 16,
        colors: tuple[str, ...] = COLORS,
        templates: tuple[str, ...] = COLOR_TEMPLATES,
    ):
        self.model, self.preprocess, self.tokenizer = model.eval().to(device), preprocess, tokenizer
        self.device, self.batch_size = device, batch_size
        self.colors, self.templates = colors, templates
        self._weights = {}  # class name -> [D, n_colors]

    def weights(self, classname: str):
        import torch

        if classname not in self._weights:
            texts = [t.format(c=color, obj=classname) for color in self.colors for t in self.templates]
            with torch.no_grad():
                emb = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
            emb = torch.nn.functional.normalize(emb, dim=-1).reshape(
                len(self.colors), len(self.templates), -1
            )
            emb = torch.nn.functional.normalize(emb.mean(dim=1), dim=-1)  # [n_colors, D]
            self._weights[classname] = emb.T
        return self._weights[classname]

    def __call__(self, image: Image.Image, objects: list[dict], classname: str) -> list[str]:
        """Colour names of `objects` (dicts with "box", optional "mask") of class `classname` in `image`."""
        import torch

        weights = self.weights(classname)
        names = []
        for start in range(0, len(objects), self.batch_size):
            batch = objects[start : start + self.batch_size]
            pixels = torch.stack([self.preprocess(color_crop(image, o["box"], o.get("mask"))) for o in batch])
            with torch.no_grad():
                features = self.model.encode_image(pixels.to(self.device)).float()
                logits = 100.0 * torch.nn.functional.normalize(features, dim=-1) @ weights
            names += [self.colors[i] for i in logits.argmax(dim=1).tolist()]
        return names


def load_clip_classifier(model_name: str, pretrained: str | None, device: str) -> ClipColorClassifier:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=device
    )
    return ClipColorClassifier(model, preprocess, open_clip.get_tokenizer(model_name), device)


# ---------------------------------------------------------------- detector backends


class ShapesBackend:
    """The Shapes-world detector; drops its pixel colours when a CLIP classifier is used instead."""

    def __init__(self, vocabulary_path: str | Path, keep_colors: bool):
        self.detector = ShapesDetector(load_vocabulary(vocabulary_path))
        self.keep_colors = keep_colors

    def detect(self, path: Path, image: Image.Image) -> list[dict]:
        detections = self.detector.detect(np.asarray(image))
        if not self.keep_colors:
            for det in detections:
                del det["color"]
        return detections


class MmdetBackend:
    """The official detector: mmdet 2.x Mask2Former Swin-S (COCO), classes named by object_names.txt."""

    def __init__(self, config: str | None, checkpoint: str, object_names: str, device: str):
        from mmdet.apis import inference_detector, init_detector  # lazy: workflow/envs/geneval.yaml

        self.inference = inference_detector
        self.config = config or default_mmdet_config()
        self.classnames = [
            line.strip() for line in Path(object_names).read_text().splitlines() if line.strip()
        ]
        self.model = init_detector(self.config, checkpoint, device=device)

    def detect(self, path: Path, image: Image.Image) -> list[dict]:
        result = self.inference(self.model, str(path))  # the official script passes the file path
        bbox = result[0] if isinstance(result, tuple) else result
        segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        if len(bbox) != len(self.classnames):
            raise ValueError(
                f"detector returned {len(bbox)} classes, object names list {len(self.classnames)}"
            )
        return [
            {
                "class": name,
                "score": float(row[4]),
                "box": [float(v) for v in row[:4]],
                "mask": None if segm is None else segm[index][j],
            }
            for index, name in enumerate(self.classnames)
            for j, row in enumerate(bbox[index])
        ]


def default_mmdet_config() -> str:
    """The official config inside the installed mmdet: a source checkout's configs/ (official README)
    or a wheel's .mim/configs/."""
    import mmdet

    package = Path(mmdet.__file__).parent
    for candidate in (package.parent / "configs" / MMDET_CONFIG, package / ".mim" / "configs" / MMDET_CONFIG):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"{MMDET_CONFIG} not found beside mmdet ({package}); pass --mmdet-config")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- generated folder and CLI


def prompt_folders(gen_dir: str | Path) -> list[tuple[dict, list[Path]]]:
    """(metadata, sample paths) per prompt folder of a GenEval-layout folder, in folder-name order:
    digit-named folders with metadata.jsonl and samples/<digits>.png, as the official script reads."""
    gen_dir = Path(gen_dir)
    if not gen_dir.is_dir():
        raise FileNotFoundError(f"generated folder not found: {gen_dir}")
    prompts = []
    for folder in sorted(p for p in gen_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_path = folder / "metadata.jsonl"
        try:
            metadata = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read GenEval metadata {meta_path}: {err}") from err
        samples = sorted(p for p in (folder / "samples").glob("*.png") if SAMPLE_NAME.fullmatch(p.name))
        prompts.append((metadata, samples))
    if not any(samples for _, samples in prompts):
        raise ValueError(f"no GenEval samples (<index>/samples/<k>.png) under {gen_dir}")
    return prompts


def score_folder(
    gen_dir: Path, backend, classifier: ClipColorClassifier | None, settings: GenEvalSettings
) -> list[dict]:
    """Per-image results in the official results.jsonl schema (metadata and details as JSON strings)."""
    results = []
    items = [(meta, path) for meta, samples in prompt_folders(gen_dir) for path in samples]
    for metadata, path in tqdm(items, desc="geneval", unit="img", mininterval=2):
        image = load_rgb(path)
        detections = backend.detect(path, image)
        objects = select_detections(detections, metadata["tag"], settings)
        classify = (
            None if classifier is None else (lambda objs, name, image=image: classifier(image, objs, name))
        )
        correct, reason = evaluate(metadata, objects, classify, settings)
        details = {
            name: [[*map(float, d["box"][:4]), float(d["score"])] for d in dets]
            for name, dets in objects.items()
        }
        results.append(
            {
                "filename": path.relative_to(gen_dir).as_posix(),
                "tag": metadata["tag"],
                "prompt": metadata["prompt"],
                "correct": correct,
                "reason": reason,
                "metadata": json.dumps(metadata),
                "details": json.dumps(details),
            }
        )
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "gen_dir", nargs="?", type=Path, help="generated folder (<index>/metadata.jsonl + samples/)"
    )
    parser.add_argument("--backend", choices=["shapes", "mmdet"], default="shapes")
    parser.add_argument("--vocabulary", type=Path, help="Shapes world vocabulary.json (shapes backend)")
    parser.add_argument(
        "--clip-model",
        help="open_clip model for colours (mmdet default ViT-L-14; shapes: colours from pixels unless given)",
    )
    parser.add_argument(
        "--clip-pretrained", help="open_clip pretrained tag or weights file (mmdet default openai)"
    )
    parser.add_argument("--mmdet-config", help="Mask2Former config (default: the official one inside mmdet)")
    parser.add_argument(
        "--mmdet-checkpoint", type=Path, help="mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth"
    )
    parser.add_argument("--object-names", type=Path, help="GenEval's object_names.txt (mmdet class order)")
    parser.add_argument(
        "--results-jsonl",
        type=Path,
        help="per-image results (default: beside --out as <out stem>.results.jsonl)",
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--validate-shapes",
        type=Path,
        metavar="SPLIT_DIR",
        help="instead of scoring: precision/recall of the Shapes detector on a split",
    )
    parser.add_argument(
        "--validate-images",
        type=Path,
        metavar="DIR",
        help="with --validate-shapes: read <id>.png from DIR (e.g. VQ reconstructions)",
    )


def results_path(args: argparse.Namespace) -> Path | None:
    """--results-jsonl, else <--out without suffix>.results.jsonl, else None (not written)."""
    if args.results_jsonl:
        return args.results_jsonl
    if args.out:
        return Path(args.out).with_suffix(".results.jsonl")
    return None


def run_validation(args: argparse.Namespace) -> dict:
    if not args.vocabulary:
        raise SystemExit("--validate-shapes needs --vocabulary")
    detector = ShapesDetector(load_vocabulary(args.vocabulary))
    report = validate_detector(args.validate_shapes, detector, args.validate_images)
    n_images = report.pop("n_images")
    return {
        "values": {f"shapes_detector_{k}": v for k, v in report.items()},
        "n_images": n_images,
        "settings": {
            "mode": "validate-shapes",
            "min_score": 0.3,
            "min_iou": 0.5,
            "detector": asdict(detector.settings),
        },
        "inputs": {
            "split_dir": str(args.validate_shapes),
            "images_dir": str(args.validate_images or Path(args.validate_shapes) / "images"),
            "vocabulary_sha256": sha256_file(args.vocabulary),
        },
    }


def run(args: argparse.Namespace) -> dict:
    if args.validate_shapes:
        return run_validation(args)
    if args.gen_dir is None:
        raise SystemExit("give the generated folder GEN_DIR (or --validate-shapes SPLIT_DIR)")
    settings = GenEvalSettings()
    weights: dict[str, str] = {}
    clip_model, clip_pretrained = args.clip_model, args.clip_pretrained
    if args.backend == "shapes":
        if not args.vocabulary:
            raise SystemExit("the shapes backend needs --vocabulary")
        if clip_model and not clip_pretrained:
            raise SystemExit("--clip-model needs --clip-pretrained (a tag or a weights file)")
        backend = ShapesBackend(args.vocabulary, keep_colors=clip_model is None)
    else:
        if not (args.mmdet_checkpoint and args.object_names):
            raise SystemExit("the mmdet backend needs --mmdet-checkpoint and --object-names")
        clip_model, clip_pretrained = clip_model or "ViT-L-14", clip_pretrained or "openai"
        backend = MmdetBackend(
            args.mmdet_config,
            str(args.mmdet_checkpoint),
            str(args.object_names),
            args.device or default_device(),
        )
        weights["mmdet_checkpoint"] = sha256_file(args.mmdet_checkpoint)
    classifier = None
    if clip_model:
        classifier = load_clip_classifier(clip_model, clip_pretrained, args.device or default_device())
        if clip_pretrained and Path(clip_pretrained).is_file():
            weights["clip"] = sha256_file(clip_pretrained)
    results = score_folder(args.gen_dir, backend, classifier, settings)
    out_path = results_path(args)
    if out_path:
        write_bytes_atomic(out_path, "".join(json.dumps(r) + "\n" for r in results).encode())
    files = [args.gen_dir / r["filename"] for r in results]
    return {
        "values": {**summarize(results), "results_jsonl": str(out_path) if out_path else None},
        "n_images": {"images": len(results), "prompts": len({r["metadata"] for r in results})},
        "settings": {
            **asdict(settings),
            "backend": args.backend,
            "color_source": "clip" if classifier else "detector",
            "clip_model": clip_model,
            "clip_pretrained": clip_pretrained,
            "colors": list(COLORS),
            "color_templates": list(COLOR_TEMPLATES),
            "mask_background": MASK_BACKGROUND,
            "mmdet_config": getattr(backend, "config", None),
            "shapes_detector": asdict(DetectorSettings()) if args.backend == "shapes" else None,
        },
        "inputs": {
            "gen_dir": str(args.gen_dir),
            "gen_files_sha256": file_list_hash(files, args.gen_dir),
            "vocabulary_sha256": sha256_file(args.vocabulary) if args.backend == "shapes" else None,
            "object_names_sha256": sha256_file(args.object_names) if args.object_names else None,
        },
        "weights_sha256": weights,
    }
