"""The project's own habits, checked in CI: lint, formatter, mypy, and short functions.

``make lint`` runs the same tools; these tests make the README's test command (what CI runs) fail
when the tree drifts from them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "workers", "flows")
TREE = ("pipeline", "workers", "flows", "tests", "benchmarks")
MAX_FUNCTION_LINES = 80


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def long_functions(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """``path:line name (N lines)`` of every function longer than :data:`MAX_FUNCTION_LINES`."""
    out = []
    for pkg in packages:
        for p in sorted((root / pkg).rglob("*.py")):
            for n in ast.walk(ast.parse(p.read_text(), str(p))):
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = (n.end_lineno or n.lineno) - n.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        out.append(f"{p.relative_to(root)}:{n.lineno} {n.name} ({length} lines)")
    return out


def test_no_function_is_longer_than_80_lines() -> None:
    assert long_functions() == []


def test_the_length_check_sees_a_long_function(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert long_functions(tmp_path, ("pkg",)) == ["pkg/m.py:1 f (81 lines)"]


def test_ruff_lint_is_clean() -> None:
    r = _tool("ruff", "check", *TREE)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]


def test_tree_is_formatted_by_the_project_formatter() -> None:
    r = _tool("ruff", "format", "--check", *TREE)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]


@pytest.mark.slow
def test_mypy_is_clean_with_check_untyped_defs() -> None:
    r = _tool("mypy")  # files and check_untyped_defs = true come from pyproject.toml
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
