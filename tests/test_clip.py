"""The Shapes CLIP: saved as an open_clip checkpoint that the evaluators' loaders (CMMD, GenEval's colour
classifier) load like any pretrained open_clip model, resumable training, and which caption objects a Shapes
retrieval must show."""

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import arrag.training.clip as clip_training
from arrag.clip import (
    ClipIndex,
    ClipSpec,
    build_clip_index,
    load_clip_encoder,
    named_objects,
    retrieval_accuracy,
    shows_named_objects,
)
from arrag.shapes.dataset import ShapesConfig, read_annotations, write_split
from arrag.shapes.vocab import CLASSES
from arrag.training.clip import (
    LOCAL_DIR_CONFIG_FILE,
    MODEL_CONFIG_FILE,
    WEIGHTS_FILE,
    ClipTrainConfig,
    contrastive_loss,
    positive_pairs,
    train_clip,
)
from evaluators import cmmd
from evaluators.__main__ import main as evaluators_main
from evaluators.geneval import COLORS, load_clip_classifier

WORLD = ShapesConfig(seed=4, image_size=32)
TINY = ClipTrainConfig(image_size=32, vision_width=8, text_width=32, text_layers=1, context_length=16, embed_dim=16,
                       steps=6, batch_size=8, max_crops=40, warmup_steps=2, checkpoint_every=2)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    write_split(root / "database", "database", 24, WORLD)
    write_split(root / "heldout", "heldout", 12, WORLD)
    return root


@pytest.fixture(scope="module")
def trained(splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_out") / "clip"
    metrics = train_clip(splits / "database", out, out.parent / "clip.pt", TINY, heldout_dir=splits / "heldout")
    return out, metrics


def test_saved_files_and_zero_shot_metrics(trained):
    out, metrics = trained
    for name in (WEIGHTS_FILE, MODEL_CONFIG_FILE, LOCAL_DIR_CONFIG_FILE, "metrics.json", "loss.csv", "loss.png"):
        assert (out / name).is_file()
    zero_shot = json.loads((out / "metrics.json").read_text())["zero_shot"]
    assert zero_shot["chance"] == {"color": 0.1, "shape": pytest.approx(1 / 6)}  # 1 / 6 through JSON: exact
    assert zero_shot["crops"]["n"] > 12 and 0 <= zero_shot["crops"]["color"] <= 1
    assert metrics["train_crops"] == 40 and metrics["steps"] == 6


def test_the_evaluators_load_it_like_a_pretrained_open_clip_model(trained, splits, tmp_path):
    """CMMD's loader (--model-config/--pretrained), GenEval's (local-dir:) and plain open_clip give one model."""
    out, _ = trained
    weights = load_file(out / WEIGHTS_FILE)
    via_cmmd = cmmd.load_clip(None, str(out / WEIGHTS_FILE), out / MODEL_CONFIG_FILE)
    via_geneval = load_clip_classifier(f"local-dir:{out}", str(out / WEIGHTS_FILE), "cpu")
    model, _, preprocess = open_clip.create_model_and_transforms("shapes_clip", pretrained=str(out / WEIGHTS_FILE))
    model.eval()
    assert via_cmmd.name == "shapes_clip" and via_cmmd.transform.size == 32
    image = Image.open(next((splits / "heldout" / "images").glob("*.png")))
    pixels = preprocess(image).unsqueeze(0)
    # same preprocessing (no resize): the same operations, measured equal; 1e-5 ~ 100 ulp of values ~2
    assert torch.allclose(via_cmmd.transform(image), pixels[0], atol=1e-5)
    with torch.no_grad():
        features = [m.encode_image(pixels) for m in (via_cmmd.model, via_geneval.model, model)]
    assert all(torch.equal(features[0], f) for f in features[1:])
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if k in weights)
    assert via_geneval(image, [{"box": [0, 0, 32, 32]}], "circle")[0] in via_geneval.colors
    for folder in ("real", "gen"):
        (tmp_path / folder).mkdir()
        for path in sorted((splits / "heldout" / "images").glob("*.png"))[:4 if folder == "real" else 3]:
            (tmp_path / folder / path.name).write_bytes(path.read_bytes())
    assert evaluators_main(["cmmd", str(tmp_path / "real"), str(tmp_path / "gen"), "--model-config",
                            str(out / MODEL_CONFIG_FILE), "--pretrained", str(out / WEIGHTS_FILE), "--num-workers",
                            "0", "--device", "cpu", "--no-cache", "--out", str(tmp_path / "cmmd.json")]) == 0
    assert json.loads((tmp_path / "cmmd.json").read_text())["settings"]["model"] == "shapes_clip"


def test_resume_after_a_kill_gives_the_same_weights(trained, splits, tmp_path, monkeypatch):
    out, _ = trained
    real, calls = clip_training.contrastive_loss, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(clip_training, "contrastive_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        train_clip(splits / "database", tmp_path / "clip", tmp_path / "clip.pt", TINY)
    monkeypatch.setattr(clip_training, "contrastive_loss", real)
    train_clip(splits / "database", tmp_path / "clip", tmp_path / "clip.pt", TINY)
    a, b = load_file(out / WEIGHTS_FILE), load_file(tmp_path / "clip" / WEIGHTS_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_contrastive_loss_with_several_positives():
    """Against the loss written out with cross_entropy, both float32: losses ~1.5 (ulp 1.2e-7), measured at most
    1.2e-7 apart over 2000 random feature draws (2.2e-7 from a float64 reference); abs 1e-6 leaves 5x."""
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    scale = torch.tensor(0.0)
    logits = features @ features.T
    plain = contrastive_loss(features, features, scale, torch.eye(4, dtype=torch.bool))
    assert plain == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.arange(4)).item(), abs=1e-6)
    positives = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    rows = positives.float() / positives.float().sum(1, keepdim=True)
    columns = positives.T.float() / positives.T.float().sum(1, keepdim=True)
    manual = torch.nn.functional.cross_entropy(logits, rows) + torch.nn.functional.cross_entropy(logits.T, columns)
    assert contrastive_loss(features, features, scale, positives) == pytest.approx(manual.item() / 2, abs=1e-6)
    negatives = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=-1)  # texts of no image
    wide = torch.cat([logits, features @ negatives.T], dim=1)
    manual = (torch.nn.functional.cross_entropy(wide, torch.nn.functional.pad(rows, (0, 3)))
              + torch.nn.functional.cross_entropy(logits.T, columns))
    assert contrastive_loss(features, features, scale, positives, negatives) == pytest.approx(manual.item() / 2,
                                                                                              abs=1e-6)
    assert set(clip_training.absent_color_captions()) >= {"a photo of a white star", "a photo of a black object"}


def test_positive_pairs_follow_what_a_caption_names():
    circle, star, red, blue = CLASSES.index("circle"), CLASSES.index("star"), COLORS.index("red"), COLORS.index("blue")
    labels = torch.tensor([[-2, -2, -2, -2], [-2, -2, -2, -2],  # two scenes
                           [circle, red, circle, red],  # "a photo of a red circle" on a red circle
                           [circle, blue, circle, -1],  # "a photo of a circle" on a blue circle
                           [star, red, -1, red]])  # "a photo of a red object" on a red star
    caption_ids = torch.tensor([0, 0, 1, 2, 3])
    assert positive_pairs(caption_ids, labels).int().tolist() == [
        [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]


def record(caption, *objects):
    return {"caption": caption, "objects": [{"class": c, "color": k} for c, k in objects]}


def test_which_objects_a_caption_names():
    assert named_objects(record("a red circle and a star", ("circle", "red"), ("star", "blue"))) == {
        ("circle", "red"): 1, ("star", None): 1}
    three = record("three red crosses", ("cross", "red"), ("cross", "red"), ("cross", "red"))
    assert named_objects(three) == {("cross", "red"): 3}
    assert shows_named_objects(three, three)
    assert not shows_named_objects(three, record("", ("cross", "red"), ("cross", "red")))  # count differs
    assert not shows_named_objects(three, record("", ("cross", "red"), ("cross", "red"), ("cross", "blue")))
    query = record("a circle left of a green square", ("circle", "pink"), ("square", "green"))
    assert shows_named_objects(query, record("", ("square", "green"), ("circle", "blue")))  # circle colour unsaid
    assert not shows_named_objects(query, record("", ("square", "blue"), ("circle", "pink")))
    accuracy = retrieval_accuracy([query, three], [query, query], [three])
    assert accuracy["top1_objects"] == 0.5 and accuracy["chance_objects"] == 0.5 and accuracy["n"] == 2


def test_crop_captions_use_genevals_templates():
    rng = np.random.default_rng(0)
    captions = {clip_training.crop_caption(rng, "star", "red") for _ in range(50)}
    assert captions == {("a photo of a red star", "star", "red"), ("a photo of a red-colored star", "star", "red"),
                        ("a photo of a red object", None, "red"), ("a photo of a star", "star", None)}


@pytest.mark.slow
def test_shapes_text_to_image_retrieval_is_far_above_chance(tmp_path):
    """The default Shapes CLIP, trained briefly (150 steps) on 4000 scenes: a caption's top-1 image shows its
    objects (classes, counts, named colours) far more often than a random database image does."""
    world = ShapesConfig(seed=0, image_size=64)
    write_split(tmp_path / "database", "database", 4000, world)
    queries = write_split(tmp_path / "train", "train", 300, world)
    train_clip(tmp_path / "database", tmp_path / "clip", tmp_path / "clip.pt", ClipTrainConfig(steps=150))
    spec = ClipSpec(None, str(tmp_path / "clip" / WEIGHTS_FILE), str(tmp_path / "clip" / MODEL_CONFIG_FILE))
    build_clip_index(tmp_path / "database", tmp_path / "index", load_clip_encoder(spec))
    index = ClipIndex(tmp_path / "index")
    _, rows = index.search([q["caption"] for q in queries], top_n=1)
    database = {r["id"]: r for r in read_annotations(tmp_path / "database")}
    accuracy = retrieval_accuracy(queries, [database[index.entries[r]["id"]] for r in rows[:, 0]],
                                  list(database.values()))
    print(accuracy)
    # floors relative to chance (not measured here: a slow test): a full match 5x as often as a random image, and
    # at least 5 % since the chance of a full match can be near 0; the looser class-only match at least 2x chance
    assert accuracy["top1_objects"] > max(0.05, 5 * accuracy["chance_objects"])
    assert accuracy["top1_classes"] > 2 * accuracy["chance_classes"]
