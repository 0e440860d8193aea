"""The layer rule and the absence of import cycles, checked on the source (lazy imports included).

Imports flow one way: ``pipeline`` <- ``workers`` <- ``flows`` (ARCHITECTURE.md). ``pipeline`` never
imports torch, prefect or distributed; ``workers`` never imports prefect or ``flows``; nothing in the
three packages imports ``benchmarks`` at module level (the CLI's ``bench`` command imports it when
run, from a checkout); and no module imports in a cycle, not even through a function-level (lazy)
import: a lazy import hides a cycle from Python, not from the reader of the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "workers", "flows")
#: package -> top-level names it must never import (at any depth, lazily or not)
FORBIDDEN = {
    "pipeline": {
        "torch",
        "prefect",
        "prefect_dask",
        "distributed",
        "dask_cuda",
        "workers",
        "flows",
        "benchmarks",
    },
    "workers": {"prefect", "prefect_dask", "flows", "benchmarks"},
    "flows": set(),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, mod: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement of the file."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    out: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            out += [(f"{base}.{a.name}", id(node) in top) for a in node.names]
    return out


def _files() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def graph() -> dict[str, set[str]]:
    files = _files()
    g: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for t, _top in _imports(path, mod):
            while t and t not in files:
                t = t.rpartition(".")[0]
            # a submodule importing its own package's __init__ is how Python loads packages
            if t and t != mod and not mod.startswith(t + "."):
                g[mod].add(t)
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                found.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    return found


def wrong_way() -> list[str]:
    bad = []
    for mod, path in _files().items():
        pkg = mod.split(".")[0]
        for t, top in _imports(path, mod):
            root = t.split(".")[0]
            if root in FORBIDDEN[pkg] or (root == "benchmarks" and top):
                bad.append(f"{mod} imports {t}")
    return sorted(set(bad))


def test_imports_flow_one_way() -> None:
    assert wrong_way() == []


def test_no_import_cycle_even_through_lazy_imports() -> None:
    g = graph()
    assert "pipeline.readers" in g["pipeline.ingest"]  # the checker sees the real edges
    assert cycles(g) == []


@pytest.mark.parametrize(
    ("g", "want"), [({"a": {"b"}, "b": {"a"}}, [["a", "b", "a"]]), ({"a": {"b"}, "b": set()}, [])]
)
def test_the_checker_sees_a_lazy_cycle(g: dict[str, set[str]], want: list[list[str]]) -> None:
    assert cycles(g) == want


def test_the_checker_sees_a_wrong_way_import(tmp_path: Path) -> None:
    p = tmp_path / "m.py"
    p.write_text("def f():\n    import torch\n")
    assert ("torch", False) in _imports(p, "pipeline.m")
