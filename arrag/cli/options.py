"""Options shared by several subcommands, and the defaults every option takes from the config schema.

A subcommand's option that mirrors a config key (`--steps` of `train-vq` and `shapes_models.vq.steps`) takes its
default from `workflow/schemas/config.schema.yaml`, so that a command run by hand and the workflow's rule agree.
"""

from __future__ import annotations

import argparse
from functools import cache
from pathlib import Path

import yaml

try:  # libyaml's loader: 10x faster on the schema than the pure-Python one
    from yaml import CSafeLoader as SafeLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader

# arrag.config.SCHEMA_PATH, without importing jsonschema: every command builds the parser, so its cost is paid by
# every job of the workflow (a test checks that the two paths are the same file)
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


@cache
def _schema() -> dict:
    return yaml.load(SCHEMA_PATH.read_text(), Loader=SafeLoader)


def _default(node: dict, key: str):
    for part in key.split("."):
        node = node["properties"][part]
    return node["default"]


def config_default(key: str):
    """The schema's default of the dotted config key `key`, e.g. 'shapes_models.vq.steps' -> 900."""
    return _default(_schema(), key)


def finetune_default(name: str):
    """The schema's default of setting `name` of the shared fine-tuning loop ($defs.finetune: the paper's)."""
    return _default(_schema()["$defs"]["finetune"], name)


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' where a GPU is visible, else 'cpu'; other names unchanged."""
    import torch

    return name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=config_default("device"), choices=["auto", "cpu", "cuda"])


def precision_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", default=config_default("precision"), choices=["auto", "fp32", "bf16"],
                        help="compute precision; auto: bf16 only where the device has native bf16 (arrag.precision)")


def tokens_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=Path, help="VQ tokens of the images (`arrag tokenize`; default: encode here)")


def showo_tokenizer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", default="", help="Show-o's image tokenizer: MAGVIT-v2 hub id or folder "
                        "(showlab/magvitv2); empty: the VQ inside a Shapes-world Show-o's folder")
    parser.add_argument("--tokenizer-revision", default="", help="pinned hub revision of --tokenizer (empty: none)")
    parser.add_argument("--text-tokenizer", default="", help="Show-o's text tokenizer, folder or hub id (empty: the "
                        "backbone folder's, else its config's llm_model_path, microsoft/phi-1_5)")
