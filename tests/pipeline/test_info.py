"""``scene_info`` / ``hyperdeq info`` and ``hyperdeq ingest`` on the shipped real files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from pipeline.errors import WriteError
from pipeline.info import format_info, scene_info
from pipeline.ingest import ingest_scene, open_zarr_scene, store_metadata
from pipeline.readers import open_scene
from pipeline.scene import MissingCRSWarning
from tests.pipeline.test_readers import DEMO, GAMSBERG, TILE


def _expected_nodata(path: Path) -> float:
    da = open_scene(path)
    good = da["good_band"].values
    return float(1.0 - np.isfinite(da.values[good]).all(axis=0).mean())


def test_info_geotiff() -> None:
    info = scene_info(TILE)
    assert info.format == "geotiff" and info.shape == (224, 32, 32)
    assert info.wavelength_min_nm == pytest.approx(
        418.24
    ) and info.wavelength_max_nm == pytest.approx(2445.53)
    assert info.crs == "EPSG:32633" and info.resolution == (30.0, 30.0)
    assert len(info.bad_bands) == 6
    assert info.nodata_fraction == pytest.approx(_expected_nodata(TILE))
    assert info.bytes_on_disk == TILE.stat().st_size and info.bytes_in_memory == 224 * 32 * 32 * 4
    assert info.scale_factor == 10000.0 and info.complete is None
    text = format_info(info)
    assert (
        "224 bands × 32 rows × 32 cols" in text
        and "418.2–2445.5 nm" in text
        and "EPSG:32633" in text
    )


def test_info_envi_without_crs() -> None:
    info = scene_info(GAMSBERG)
    assert info.crs is None and info.resolution is None and info.nodata_fraction == 0.0
    assert (
        info.bytes_on_disk == GAMSBERG.stat().st_size + GAMSBERG.with_suffix(".hdr").stat().st_size
    )
    assert "none (outputs cannot be georeferenced)" in format_info(info)


def test_info_zarr_store_uses_recorded_statistics(tmp_path: Path) -> None:
    dest = ingest_scene(DEMO, tmp_path / "d.zarr", chunk=96)
    info = scene_info(dest)
    assert info.format == "zarr" and info.complete is True
    assert info.nodata_fraction == pytest.approx(_expected_nodata(DEMO))
    assert info.nodata_fraction == store_metadata(dest)["nodata_fraction"]
    assert 0.35 < info.nodata_fraction < 0.45  # the mosaic's holes where no tile exists
    assert info.crs == "EPSG:32633" and info.resolution == (30.0, 30.0)


def _cli() -> typer.Typer:
    from flows.cli_io import register

    app = typer.Typer()
    register(app, {})
    return app


def test_cli_info_and_ingest(tmp_path: Path) -> None:
    runner = CliRunner()
    app = _cli()
    res = runner.invoke(app, ["info", str(TILE)])
    assert res.exit_code == 0, res.output
    assert "EPSG:32633" in res.output and "bad bands:  6" in res.output
    res = runner.invoke(app, ["info", str(TILE), "--json"])
    assert json.loads(res.output)["shape"] == [224, 32, 32]
    dest = tmp_path / "t.zarr"
    res = runner.invoke(app, ["ingest", str(TILE), str(dest), "--chunk", "16"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "4/4" in res.output
    np.testing.assert_array_equal(open_zarr_scene(dest).values, open_scene(TILE).values)
    res = runner.invoke(app, ["ingest", str(TILE), str(dest)])
    assert isinstance(res.exception, WriteError) and "--overwrite" in str(res.exception)
    res = runner.invoke(app, ["ingest", str(TILE), str(dest), "--overwrite", "--format", "geotiff"])
    assert res.exit_code == 0, res.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingCRSWarning)
        res = runner.invoke(
            app, ["ingest", str(GAMSBERG), str(tmp_path / "g.zarr"), "--chunk", "8"]
        )
    assert res.exit_code == 0, res.output
