"""The Shapes world's vocabulary: object classes, colours, backgrounds, number words, caption templates.

It is written as data (`vocabulary.json`) beside every generated benchmark, so that evaluators read
the world without importing `arrag`. Colour names come from GenEval's colour list.
"""

from __future__ import annotations

from pathlib import Path

from evaluators.io import write_json_atomic

VOCAB_VERSION = 1

CLASSES = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS = {name: name + ("es" if name.endswith(("s", "x", "ss")) else "s") for name in CLASSES}

# Object colours (sRGB). Chosen far apart from each other and from every background.
COLORS = {
    "red": (215, 38, 38),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 30),
    "green": (40, 160, 60),
    "blue": (40, 90, 225),
    "purple": (135, 60, 190),
    "pink": (250, 135, 195),
    "brown": (125, 75, 35),
}

BACKGROUNDS = {
    "light": (218, 218, 218),
    "dark": (48, 48, 54),
    "sand": (232, 220, 186),
}

NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")

# Caption templates. {obj} is a noun phrase ("a red circle", "three stars"), {bg} a background name.
SINGLE_TEMPLATES = ("a photo of {obj}", "{obj}", "an image of {obj}", "{obj} on a {bg} background")
PAIR_TEMPLATES = (
    "a photo of {a} and {b}",
    "{a} and {b}",
    "{a} and {b} on a {bg} background",
    "an image of {a} and {b}",
)
RELATION_TEMPLATES = ("a photo of {a} {rel} {b}", "{a} {rel} {b}", "{a} {rel} {b} on a {bg} background")
# Phrases for relations in running text; GenEval prompts use the bare form ("right of").
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def vocabulary() -> dict:
    """The vocabulary as a JSON-serialisable dict (the content of `vocabulary.json`)."""
    return {
        "world": "shapes",
        "version": VOCAB_VERSION,
        "classes": list(CLASSES),
        "plurals": dict(PLURALS),
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "backgrounds": {name: list(rgb) for name, rgb in BACKGROUNDS.items()},
        "numbers": {str(n): word for n, word in NUMBERS.items()},
        "relations": list(RELATIONS),
        "relation_phrases": dict(RELATION_PHRASES),
        "templates": {
            "single": list(SINGLE_TEMPLATES),
            "pair": list(PAIR_TEMPLATES),
            "relation": list(RELATION_TEMPLATES),
        },
    }


def write_vocabulary(path: str | Path, image_size: int) -> None:
    write_json_atomic(path, {**vocabulary(), "image_size": image_size})
