"""The source a workflow step runs, and its hash: a rule's `code` param, so that a change of the `arrag` or
`evaluators` code a rule runs reruns that rule (and what depends on it), and no other.

A step is an `arrag` subcommand (`train-vq`) or an evaluator (`eval:fid`). Its source is:
- `arrag` subcommands: the command's function and argument parser in its stage module (`arrag/cli/<stage>.py`),
  with the functions of that module they call (not the rest of it), and every module of `arrag` / `evaluators`
  they and the top of that module import, transitively (`arrag/cli/__init__.py`, which runs every command, among
  them; it imports the stage modules by name only, when the parser is built);
- evaluators: `evaluators/__main__.py` and the metric's module, with their imports, transitively.
Imports are read from the syntax tree (function-level imports included, whether or not a run reaches them),
so the set is a superset of what runs: a change outside it cannot change the step's output.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("arrag", "evaluators")


def module_file(name: str) -> Path | None:
    """The file of module `name` of this repository's packages (a package: its __init__.py), else None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(tree: ast.AST) -> set[str]:
    """Modules of this repository that the code of `tree` imports, with their parent packages; for
    `from a.b import c` both `a.b` and `a.b.c` (c may be a submodule)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    parents = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}
    return {n for n in names | parents if module_file(n) is not None}


@cache
def module_imports(name: str) -> frozenset[str]:
    path = module_file(name)
    return frozenset(imported_modules(ast.parse(path.read_text(), str(path))))


@cache
def module_closure(names: frozenset[str]) -> tuple[Path, ...]:
    """The files of modules `names` and of everything they import from this repository, sorted."""
    seen: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending.extend(module_imports(name) - seen)
    return tuple(sorted({module_file(n) for n in seen}))


@cache
def cli_functions(module: str) -> tuple[dict[str, tuple[str, frozenset[str], frozenset[str]]], frozenset[str]]:
    """A stage module of `arrag.cli` read once: {function: (source, modules it imports, functions of the module it
    names)}, and the modules imported at the top of the file."""
    path = module_file(module)
    lines = path.read_text().splitlines(keepends=True)
    tree = ast.parse("".join(lines), str(path))
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    functions = {
        node.name: ("".join(lines[node.lineno - 1:node.end_lineno]), frozenset(imported_modules(node)),
                    frozenset(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in names))
        for node in tree.body if isinstance(node, ast.FunctionDef)
    }
    top = imported_modules(ast.Module([n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], []))
    return functions, frozenset(top)


def cli_sources(command: str) -> tuple[list[str], set[str]]:
    """(sources of the command's function, its parser and the functions of its module they call; the modules these,
    the top of that module and the `arrag.cli` package import, with the package itself)."""
    from arrag.cli import command_module, commands

    function, _, add_arguments = commands()[command]
    functions, modules = cli_functions(command_module(command))
    modules, pending, seen = set(modules) | {"arrag.cli"}, [function.__name__, add_arguments.__name__], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        _, imports, called = functions[name]
        modules |= imports
        pending.extend(called)
    return [functions[name][0] for name in sorted(seen)], modules  # sorted: the same order in every process


def code_hash(step: str) -> str:
    """sha256 (16 hex digits) of the source step `step` runs: 'train-vq', 'generate', 'eval:fid', ..."""
    if step.startswith("eval:"):
        sources, modules = [], {"evaluators.__main__", f"evaluators.{step[5:]}"}
    else:
        sources, modules = cli_sources(step)
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.encode() + b"\0")
    for path in module_closure(frozenset(modules)):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def step_files(step: str) -> list[str]:
    """The repository files whose content `code_hash(step)` covers (besides the functions of its stage module)."""
    modules = {"evaluators.__main__", f"evaluators.{step[5:]}"} if step.startswith("eval:") else cli_sources(step)[1]
    return [p.relative_to(ROOT).as_posix() for p in module_closure(frozenset(modules))]
