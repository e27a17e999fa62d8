"""The shape of the code: no import cycle among nestprune modules, and the layering STYLE.md asks for.

The import graph is read from the source with ``ast`` (every import, function-level ones included: a
cycle hidden inside a function is still a cycle in the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

import nestprune

ROOT = Path(nestprune.__file__).resolve().parent.parent
# package name -> folder (cli/ and schemas/ are installed as nestprune.cli and nestprune.schemas)
PACKAGE_DIRS = {"nestprune": ROOT / "nestprune", "nestprune.cli": ROOT / "cli", "nestprune.schemas": ROOT / "schemas"}


def module_files() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg, folder in PACKAGE_DIRS.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "nestprune" and parts and parts[0] in ("cli", "schemas"):
                continue
            mods[name] = f
    return mods


def imports_of(path: Path, modules: set[str], this: str) -> set[str]:
    """nestprune modules imported anywhere in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    found.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = this if is_pkg else this.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:
                    found.add(sub)
                elif base in modules:
                    found.add(base)
    found.discard(this)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    return {m: imports_of(f, names, m) for m, f in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_module_graph_is_read():
    graph = import_graph()
    assert "nestprune.cli.main" in graph and "nestprune.schemas.artifact" in graph
    assert "nestprune.schemas.artifact" in graph["nestprune.artifact"]


def test_no_import_cycle_among_nestprune_modules():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layering():
    """schemas import neither torch nor the library; the library never imports the CLI."""
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("nestprune.schemas"):
            assert all(d.startswith("nestprune.schemas") for d in deps), (mod, deps)
            assert "import torch" not in module_files()[mod].read_text(), mod
        elif not mod.startswith("nestprune.cli") and mod not in ("nestprune.__main__",):
            assert not any(d.startswith("nestprune.cli") for d in deps), (mod, deps)


PURE = ("nestprune.rank.score", "nestprune.rank.schedule", "nestprune.ranking", "nestprune.variant.widths",
        "nestprune.registry.nested")


def test_pure_modules_touch_no_files_or_formats():
    for mod in PURE:
        text = module_files()[mod].read_text()
        for banned in ("import zarr", "safetensors", "import typer", "open(", "Path("):
            assert banned not in text, f"{mod} uses {banned!r}"
