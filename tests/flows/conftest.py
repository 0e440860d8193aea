"""Fixtures for the flow tests: small real scenes cut from the shipped EnMAP Potsdam tile, and an
isolated Prefect (temporary SQLite server, own PREFECT_HOME)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def crop_geotiff(src: Path, dst: Path, y0: int, x0: int, size: int) -> Path:
    """Copy a window of a real GeoTIFF with its georeferencing, nodata, scales and band tags."""
    from pipeline.readers.geotiff import crop_geotiff as crop

    return crop(src, dst, (y0, y0 + size, x0, x0 + size))


@pytest.fixture(scope="session")
def enmap_tile(test_data: Path) -> Path:
    return test_data / "enmap_potsdam_tile" / "enmap_potsdam_tile_128_0.tif"


@pytest.fixture
def small_archive(tmp_path: Path, enmap_tile: Path) -> Path:
    """An archive of two real 16x16 EnMAP scenes (different windows of the shipped tile)."""
    root = tmp_path / "archive" / "2022" / "07" / "images"
    root.mkdir(parents=True)
    crop_geotiff(enmap_tile, root / "enmap_potsdam_tile_a.tif", 0, 0, 16)
    crop_geotiff(enmap_tile, root / "enmap_potsdam_tile_b.tif", 16, 16, 16)
    (root / "notes.txt").write_text("not a scene\n")
    return tmp_path / "archive"


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One temporary Prefect server (SQLite) for the session's in-process flow runs."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_UI_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings(
        {
            PREFECT_HOME: str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED: False,
            PREFECT_UI_ENABLED: False,
        }
    ):
        with prefect_test_harness(server_startup_timeout=120):
            yield


def decsc_installed() -> bool:
    from flows.cli_flow import _decsc_available

    return _decsc_available()
