"""Shared test configuration: data locations and marker handling."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / "data"
# the full real-data folder (optional); tests that need it skip when it is absent
SHARED_DATA = Path(os.environ.get("HYPERDEQ_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch missing
        return False


def _long_files_first(items: list[pytest.Item]) -> None:
    """Files holding integration tests first, then files with slow tests, then the rest (each
    file's tests stay together, in order):
    with ``pytest -n 2 --dist loadfile`` (``make test``) the long files then start at once on
    both processes instead of one of them finishing the suite alone."""
    rank: dict[str, int] = {}
    for item in items:
        marks = set(item.keywords)
        r = 0 if "integration" in marks else 1 if "slow" in marks else 2
        rank[str(item.path)] = min(r, rank.get(str(item.path), 2))
    items.sort(key=lambda item: rank[str(item.path)])  # stable: order kept within a file


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _long_files_first(items)
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def test_data() -> Path:
    return TEST_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA
