"""The `arrag` command line: one subcommand per workflow step; the Snakemake rules are thin calls of these.

The subcommands live in one module per stage (`data`, `models`, `index`, `finetune`, `generate`, `results`), each
with a `COMMANDS` table {name: (function, help, add_arguments)}. They are imported by name here, when the parser
is built, so that the source a command runs is its own module's (`arrag.codehash` hashes it per command).
"""

from __future__ import annotations

import argparse
import importlib
from functools import cache

from arrag import __version__

STAGES = ("data", "models", "index", "finetune", "generate", "results")


@cache
def commands() -> dict[str, tuple]:
    """{subcommand: (function, help, add_arguments)} of every stage module, in stage order (built once: the
    workflow asks it for every rule's code hash)."""
    table = {}
    for stage in STAGES:
        table.update(importlib.import_module(f"arrag.cli.{stage}").COMMANDS)
    return table


def command_module(name: str) -> str:
    """The module that defines subcommand `name`, e.g. 'train-vq' -> 'arrag.cli.models'."""
    return commands()[name][0].__module__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arrag", description="AR-RAG benchmark harness.")
    parser.add_argument("--version", action="version", version=f"arrag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (function, help_text, add_arguments) in commands().items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text,
                                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_arguments(command_parser)
        command_parser.set_defaults(function=function)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.function(args) or 0
