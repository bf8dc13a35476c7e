"""Train the Shapes CLIP: a small open_clip model from a custom config, contrastive on Shapes image-caption pairs.

No CLIP weights can be downloaded here, so the Shapes world trains its own. It serves three users through the
loading path of any open_clip checkpoint:
- RA-CM3's image-level retrieval (text query -> database image), `arrag.clip`;
- CMMD: `python -m evaluators cmmd --model-config DIR/shapes_clip.json --pretrained DIR/open_clip_model.safetensors`;
- GenEval's zero-shot colour classifier: `--clip-model local-dir:DIR --clip-pretrained DIR/open_clip_model.safetensors`
  (open_clip reads DIR/open_clip_config.json and the weights in DIR; the pretrained path is only recorded).

Architecture: open_clip's ModifiedResNet vision tower (CLIP RN50's design, a few small stages; a ViT of the
same cost learnt shapes more slowly here) at the world's image size, and a causal text transformer with
open_clip's bundled BPE tokenizer (`SimpleTokenizer`, no download), both small (see `ClipTrainConfig`).

Training pairs, drawn anew every step from the split (deterministic in (seed, step)):
- scenes: a database image with its caption (colours are sometimes omitted, as the world's captions do);
- object crops, a `crop_fraction` of each batch: one object composited on #999 and cropped to its box, then
  resized and centre-cropped as open_clip's preprocessing does, which is exactly what GenEval's colour
  classifier feeds the model; captioned "a photo of a red circle", "a photo of a red-colored circle",
  "a photo of a red object" (GenEval's colour templates) or "a photo of a circle".
Captions of GenEval's two colours the world lacks (black, white) are text-only negatives in every batch.
Loss: the symmetric CLIP cross-entropy with a learnt temperature and several positives per row (soft targets):
a caption is a positive of every image it is true of. Scenes: identical captions. Crops: the class and colour
the caption names match the object's ("a photo of a circle" is true of every circle crop, "a photo of a red
object" of every red one), so class-only and colour-only captions teach shape and colour apart. Without this,
colour alone separates most crop pairs and shape is learnt many times slower. AdamW, warm-up, cosine decay.

Outputs of `train_clip` (one folder): open_clip_model.safetensors, shapes_clip.json (the model config, for
`open_clip.add_model_config`), open_clip_config.json (model + preprocess config, for `local-dir:`),
metrics.json (zero-shot accuracies on held-out renders), loss.csv, loss.png.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from arrag.precision import autocast, machine, resolve_precision
from arrag.shapes.dataset import read_annotations
from arrag.shapes.vocab import CLASSES
from arrag.shapes.vocab import COLORS as WORLD_COLORS
from arrag.training.loop import resume, save_training, step_generator
from arrag.training.vq import read_images
from evaluators.geneval import COLOR_TEMPLATES, COLORS, color_crop, load_clip_classifier
from evaluators.io import write_json_atomic

MODEL_NAME = "shapes_clip"  # registered from MODEL_CONFIG_FILE by open_clip.add_model_config
WEIGHTS_FILE = "open_clip_model.safetensors"
MODEL_CONFIG_FILE = f"{MODEL_NAME}.json"
LOCAL_DIR_CONFIG_FILE = "open_clip_config.json"
SHAPE_TEMPLATES = ("a photo of a {obj}", "a {obj}", "an image of a {obj}")


@dataclass(frozen=True)
class ClipTrainConfig:
    image_size: int = 64
    vision_width: int = 16  # ModifiedResNet stem width (the stages have 4x to 32x as many channels)
    vision_layers: tuple[int, ...] = (1, 1, 1, 1)  # bottleneck blocks per stage; image_size must be a multiple of 32
    text_width: int = 64
    text_layers: int = 2
    context_length: int = 32  # Shapes captions are at most about 20 BPE tokens
    embed_dim: int = 128
    steps: int = 300
    batch_size: int = 128
    crop_fraction: float = 0.5
    max_crops: int = 20000  # object crops prepared from the first images of the split
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    checkpoint_every: int = 50
    precision: str = "auto"  # auto | fp32 | bf16 (arrag.precision); resolved before training
    seed: int = 0


def model_config(config: ClipTrainConfig) -> dict:
    """The open_clip model config (keys embed_dim, vision_cfg, text_cfg), as in open_clip's model_configs/."""
    return {
        "embed_dim": config.embed_dim,
        "vision_cfg": {"image_size": config.image_size, "layers": list(config.vision_layers),
                       "width": config.vision_width, "patch_size": None},
        "text_cfg": {"context_length": config.context_length, "vocab_size": 49408, "width": config.text_width,
                     "heads": max(1, config.text_width // 32), "layers": config.text_layers},
    }


def learning_rate(config: ClipTrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def crop_caption(rng: np.random.Generator, cls: str, color: str) -> tuple[str, str | None, str | None]:
    """One of GenEval's colour templates or the class alone -> (caption, named class, named colour), None for
    what the caption does not name ("a photo of a red object": no class; "a photo of a circle": no colour)."""
    template = (*COLOR_TEMPLATES, "a photo of a {obj}")[rng.integers(len(COLOR_TEMPLATES) + 1)]
    return (template.format(c=color, obj=cls), cls if "{obj}" in template else None,
            color if "{c}" in template else None)


def object_crops(split_dir: str | Path, records: list[dict], image_size: int, limit: int,
                 seed: int) -> tuple[torch.Tensor, list[str], list[dict]]:
    """Every object of the split's images (up to `limit`) as GenEval's colour classifier sees it: the object
    composited on #999, cropped to its box, resized (bicubic, shortest side) and centre-cropped to
    `image_size`. Returns (uint8 crops [K, S, S, 3], captions [K], labels [K, 4] long: class and colour of the
    object, class and colour the caption names (-1: not named); indices into CLASSES and COLORS)."""
    resize = open_clip.image_transform(image_size, is_train=False).transforms[:2]  # Resize, CenterCrop
    rng = np.random.default_rng([seed, 7])
    crops, captions, labels = [], [], []
    for record in records:
        if len(crops) >= limit:
            break
        image = Image.open(Path(split_dir) / "images" / f"{record['id']}.png").convert("RGB")
        mask = np.asarray(Image.open(Path(split_dir) / "masks" / f"{record['id']}.png"))
        for index, obj in enumerate(record["objects"][: limit - len(crops)]):
            crop = color_crop(image, obj["box"], mask == index + 1)
            for transform in resize:
                crop = transform(crop)
            crops.append(np.asarray(crop))
            caption, named_class, named_color = crop_caption(rng, obj["class"], obj["color"])
            captions.append(caption)
            labels.append([CLASSES.index(obj["class"]), COLORS.index(obj["color"]),
                           CLASSES.index(named_class) if named_class else -1,
                           COLORS.index(named_color) if named_color else -1])
    return torch.from_numpy(np.stack(crops)), captions, torch.tensor(labels, dtype=torch.long).view(-1, 4)


def normalize_pixels(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> float [B, 3, S, S] normalised as open_clip's preprocessing."""
    pixels = images.permute(0, 3, 1, 2).float() / 255.0
    return ((pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]).contiguous()


def positive_pairs(caption_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, B] bool: is text j true of image i? Yes when the captions are identical (caption_ids [B]), or when
    both rows are object crops (labels [B, 4] as `object_crops`, -2 for scenes) and the class and colour that
    text j names (if any) are those of image i's object."""
    crop = labels[:, 0] >= 0
    named = labels[None, :, 2:]  # [1, B, 2] what each text names
    holds = ((named < 0) | (named == labels[:, None, :2])).all(-1)  # [B, B]
    return (caption_ids[:, None] == caption_ids[None, :]) | (crop[:, None] & crop[None, :] & holds)


def absent_color_captions() -> list[str]:
    """Captions of GenEval's colours that no Shapes object has (black, white), for every class and template:
    text-only negatives, so that GenEval's 10-colour classifier cannot pick an untrained colour word."""
    absent = [c for c in COLORS if c not in WORLD_COLORS]
    return sorted({t.format(c=c, obj=cls) for c in absent for cls in CLASSES for t in COLOR_TEMPLATES})


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     positives: torch.Tensor, negative_texts: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric CLIP loss for normalised features [B, D] with several positives per row (positives [B, B]
    bool, image i x text j, diagonal true): each direction's targets are uniform over the row's positives.
    `negative_texts` [K, D] join every image's candidates as texts true of no image. With the identity as
    positives and no negatives this is the CLIP loss."""
    scale = logit_scale.exp()
    logits = scale * image_features @ text_features.T  # [B, B]
    positives = positives.float()
    image_to_text = positives / positives.sum(1, keepdim=True)
    text_to_image = positives.T / positives.T.sum(1, keepdim=True)
    text_loss = F.cross_entropy(logits.T, text_to_image)
    if negative_texts is not None:
        logits = torch.cat([logits, scale * image_features @ negative_texts.T], dim=1)  # [B, B + K]
        image_to_text = F.pad(image_to_text, (0, len(negative_texts)))
    return (F.cross_entropy(logits, image_to_text) + text_loss) / 2


def save_clip(model: torch.nn.Module, config: ClipTrainConfig, out_dir: Path) -> None:
    """Weights (safetensors) plus the two config files open_clip reads (see the module docstring)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
    cfg = model_config(config)
    (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (out_dir / LOCAL_DIR_CONFIG_FILE).write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2) + "\n")


def train_clip(split_dir: str | Path, out_dir: str | Path, checkpoint: str | Path, config: ClipTrainConfig,
               heldout_dir: str | Path | None = None) -> dict:
    """Train on `split_dir` (images, masks, annotations) and save into `out_dir`; zero-shot accuracies on
    `heldout_dir` go to metrics.json. Resumes from `checkpoint` if present, with the same result."""
    config = replace(config, precision=resolve_precision(config.precision))
    torch.manual_seed(config.seed)
    records = read_annotations(split_dir)
    scenes = read_images(split_dir)
    crops, crop_captions, crop_labels = object_crops(split_dir, records, config.image_size, config.max_crops,
                                                     config.seed)
    captions = [r["caption"] for r in records] + crop_captions
    caption_index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_ids = torch.tensor([caption_index[c] for c in captions])
    labels = torch.cat([torch.full((len(scenes), 4), -2), crop_labels])  # [n_scenes + n_crops, 4]
    model = open_clip.CLIP(**model_config(config))
    tokenizer = open_clip.SimpleTokenizer(context_length=config.context_length)
    tokens = tokenizer(captions)  # [n_scenes + n_crops, context_length]
    negative_tokens = tokenizer(absent_color_captions())  # [K, context_length]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98), eps=1e-6)
    log, start, seconds, _ = resume(checkpoint, config, model, optimizer)
    model.train()
    n_crops = round(config.batch_size * config.crop_fraction)
    started = time.perf_counter() - seconds
    progress = tqdm(range(start, config.steps), desc="train CLIP", unit="step", initial=start, total=config.steps,
                    mininterval=5)
    for step in progress:
        generator = step_generator(config.seed, step)
        scene_rows = torch.randint(len(scenes), (config.batch_size - n_crops,), generator=generator)
        crop_rows = torch.randint(len(crops), (n_crops,), generator=generator)
        images = torch.cat([scenes[scene_rows], crops[crop_rows]])
        rows = torch.cat([scene_rows, len(scenes) + crop_rows])
        pixels = normalize_pixels(images, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        with autocast(config.precision):
            image_features = F.normalize(model.encode_image(pixels).float(), dim=-1)
            text_features = F.normalize(model.encode_text(torch.cat([tokens[rows], negative_tokens])).float(), dim=-1)
        positives = positive_pairs(caption_ids[rows], labels[rows])
        loss = contrastive_loss(image_features, text_features[:len(rows)], model.logit_scale, positives,
                                negative_texts=text_features[len(rows):])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        log.add(step, loss=loss.item(), logit_scale=model.logit_scale.exp().item())
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            save_training(checkpoint, config, model, optimizer, log, step + 1, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    out_dir = Path(out_dir)
    save_clip(model.eval(), config, out_dir)
    log.write_csv(out_dir / "loss.csv")
    log.plot(out_dir / "loss.png", "Shapes CLIP training")
    metrics = {"steps": config.steps, "train_seconds": round(seconds, 1),
               "final_loss_last20": float(np.mean([r["loss"] for r in log.rows[-20:]])),
               "parameters": sum(p.numel() for p in model.parameters()), "train_scenes": len(scenes),
               "train_crops": len(crops), "config": asdict(config),
               "precision": config.precision, "machine": machine()}
    if heldout_dir is not None:
        metrics["zero_shot"] = zero_shot_accuracy(out_dir, heldout_dir)
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


@torch.no_grad()
def zero_shot_accuracy(clip_dir: str | Path, split_dir: str | Path, limit: int = 2000) -> dict:
    """Zero-shot colour and shape accuracy of a saved Shapes CLIP on a held-out split.

    Loaded as GenEval loads it (`load_clip_classifier("local-dir:...")`). `crops`: up to `limit` objects of
    the split as GenEval's colour classifier crops them (on #999, cropped to the box); colour = argmax over
    GenEval's 10 colours of its classifier's text weights for the object's class (its 3 templates); shape =
    argmax over the 6 classes of the ensembled SHAPE_TEMPLATES. `single_object_scenes`: the same decisions on
    whole images of single-object scenes. Chance: 1/10 colour, 1/6 shape.
    """
    clip_dir = Path(clip_dir)
    classifier = load_clip_classifier(f"local-dir:{clip_dir}", None, "cpu")  # local-dir: reads the weights
    model, preprocess, tokenizer = classifier.model, classifier.preprocess, classifier.tokenizer
    texts = [t.format(obj=cls) for cls in CLASSES for t in SHAPE_TEMPLATES]
    shape_weights = F.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1)
    shape_weights = F.normalize(shape_weights.view(len(CLASSES), len(SHAPE_TEMPLATES), -1).mean(1), dim=-1)

    def accuracy(images: list[Image.Image], objects: list[dict]) -> dict:
        features = torch.cat([model.encode_image(torch.stack([preprocess(i) for i in images[s:s + 256]])).float()
                              for s in range(0, len(images), 256)])
        features = F.normalize(features, dim=-1)  # [n, D]
        shapes = (features @ shape_weights.T).argmax(-1).tolist()
        colors = [int((f @ classifier.weights(o["class"])).argmax()) for f, o in zip(features, objects, strict=True)]
        return {"n": len(objects),
                "color": float(np.mean([COLORS[c] == o["color"] for c, o in zip(colors, objects, strict=True)])),
                "shape": float(np.mean([CLASSES[s] == o["class"] for s, o in zip(shapes, objects, strict=True)]))}

    records = read_annotations(split_dir)
    crops, objects = [], []
    for record in records:
        image = Image.open(Path(split_dir) / "images" / f"{record['id']}.png").convert("RGB")
        mask = np.asarray(Image.open(Path(split_dir) / "masks" / f"{record['id']}.png"))
        for index, obj in enumerate(record["objects"]):
            crops.append(color_crop(image, obj["box"], mask == index + 1))
            objects.append(obj)
    result = {"chance": {"color": 1 / len(COLORS), "shape": 1 / len(CLASSES)},
              "crops": accuracy(crops[:limit], objects[:limit])}
    singles = [r for r in records if r["kind"] == "single"][:limit]
    if singles:
        images = [Image.open(Path(split_dir) / "images" / f"{r['id']}.png").convert("RGB") for r in singles]
        result["single_object_scenes"] = accuracy(images, [r["objects"][0] for r in singles])
    return result
