"""Streaming zarr v3 ingest: round trips on every real file, layout, provenance, resume, refusals."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import dask.array as dsk
import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline.errors import ConfigError, ReadError, WriteError
from pipeline.ingest import ingest_scene, open_zarr_scene, store_metadata
from pipeline.readers import open_scene
from pipeline.scene import MissingCRSWarning
from tests.pipeline.test_readers import BERLIN, DEMO, GAMSBERG, PAVIA, TILE, quiet_open, write_envi


def _ingest(src: Path, dest: Path, **kw: object) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingCRSWarning)
        return ingest_scene(src, dest, **kw)


def _reopen(dest: Path) -> xr.DataArray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingCRSWarning)
        return open_zarr_scene(dest)


def _assert_same_scene(a: xr.DataArray, b: xr.DataArray) -> None:
    np.testing.assert_array_equal(a.values, b.values)  # NaN (nodata) positions included
    for c in ("wavelength", "fwhm", "good_band", "x", "y"):
        np.testing.assert_array_equal(a[c].values, b[c].values)
    assert a.rio.crs == b.rio.crs
    if not a.attrs["crs_missing"]:
        assert a.rio.transform() == b.rio.transform()
    for k in ("source_scale_factor", "crs_missing", "reader", "source"):
        assert a.attrs[k] == b.attrs[k], k


@pytest.mark.parametrize(
    "src, chunk",
    [(TILE, 20), (BERLIN, 4), (GAMSBERG, 8), (PAVIA, 32), (DEMO, 64)],
    ids=["geotiff-tile", "geotiff-int16-aux", "envi", "mat", "demo-mosaic"],
)
def test_round_trip_every_reader(tmp_path: Path, src: Path, chunk: int) -> None:
    dest = _ingest(src, tmp_path / "s.zarr", chunk=chunk)
    back = _reopen(dest)
    assert isinstance(back.data, dsk.Array)
    assert back.data.chunksize[0] == back.shape[0]  # all bands in one chunk
    _assert_same_scene(quiet_open(src), back)
    # reading the store through open_scene gives the same scene
    _assert_same_scene(back, quiet_open(dest))


def test_round_trip_netcdf(tmp_path: Path) -> None:
    scene = open_scene(TILE).load()
    nc = tmp_path / "t.nc"
    ds = scene.copy()
    ds.attrs = {}
    ds.to_dataset(name="refl").to_netcdf(nc)
    back = _reopen(_ingest(nc, tmp_path / "n.zarr", chunk=16, scale_factor=1.0))
    np.testing.assert_array_equal(back.values, scene.values)
    assert back.rio.crs == scene.rio.crs and back.rio.transform() == scene.rio.transform()


def test_store_layout_and_provenance(tmp_path: Path) -> None:
    dest = ingest_scene(TILE, tmp_path / "t.zarr", chunk=16)
    root = json.loads((dest / "zarr.json").read_text())
    assert root["zarr_format"] == 3
    var = json.loads((dest / "reflectance" / "zarr.json").read_text())
    assert var["chunk_grid"]["configuration"]["chunk_shape"] == [224, 16, 16]
    blosc = [c for c in var["codecs"] if c["name"] == "blosc"]
    assert blosc and blosc[0]["configuration"]["cname"] == "zstd"
    assert blosc[0]["configuration"]["blocksize"] == 1 << 20
    assert var["attributes"]["grid_mapping"] == "spatial_ref"
    assert "crs_wkt" in json.loads((dest / "spatial_ref" / "zarr.json").read_text())["attributes"]
    meta = store_metadata(dest)
    assert meta["complete"] is True and meta["reader"] == "geotiff" and meta["chunk"] == 16
    assert meta["source_sha256"] == hashlib.sha256(TILE.read_bytes()).hexdigest()
    assert meta["hyperdeq_version"] and meta["scale_factor"] == 10000.0
    assert meta["progress"]["done"] == "1" * 4
    attrs = root["attributes"]
    assert attrs["proj:epsg"] == 32633 and attrs["proj:shape"] == [32, 32]
    assert attrs["proj:transform"] == [30.0, 0.0, 366015.0, 0.0, -30.0, 5809965.0]
    # the raw zarr values are already canonical: no CF scale_factor can rescale them on reopen
    raw = zarr.open_group(dest, mode="r")["reflectance"][:]
    np.testing.assert_array_equal(raw, open_scene(TILE).values)
    ds = xr.open_zarr(dest, consolidated=False)
    np.testing.assert_array_equal(ds["reflectance"].values, raw)
    assert ds["reflectance"].rio.crs.to_epsg() == 32633  # plain xarray+rioxarray sees the CRS


def test_progress_reports_every_region(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    ingest_scene(TILE, tmp_path / "p.zarr", chunk=10, progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, 16) and calls[-1] == (16, 16) and len(calls) == 17


class _Crash(RuntimeError):
    pass


def test_interrupted_ingest_is_refused_then_resumed(tmp_path: Path) -> None:
    dest = tmp_path / "r.zarr"

    def crash_after_three(done: int, total: int) -> None:
        if done == 3:
            raise _Crash("simulated power cut")

    with pytest.raises(_Crash):
        ingest_scene(TILE, dest, chunk=11, progress=crash_after_three)
    assert store_metadata(dest)["complete"] is False
    recorded = store_metadata(dest)["progress"]["done"].count("1")
    assert 3 <= recorded <= 4  # 2 writer threads: the region in flight beside the 3rd may land too
    with pytest.raises(
        ReadError, match=rf"incomplete: its ingest stopped after {recorded} of 9 regions.*Re-run"
    ):
        open_zarr_scene(dest)
    seen: list[tuple[int, int]] = []
    ingest_scene(TILE, dest, chunk=11, progress=lambda d, t: seen.append((d, t)))
    # resumed: the finished regions are skipped, each remaining one is reported once
    assert seen[0] == (recorded, 9) and len(seen) == 9 - recorded + 1
    scene = open_scene(TILE)
    _assert_same_scene(scene, open_zarr_scene(dest))
    expected = 1 - np.isfinite(scene.values[scene["good_band"].values]).all(0).mean()
    assert store_metadata(dest)["nodata_fraction"] == pytest.approx(float(expected))


def test_interrupted_ingest_of_other_source_needs_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "o.zarr"

    def crash(done: int, total: int) -> None:
        if done == 1:
            raise _Crash("stop")

    with pytest.raises(_Crash):
        ingest_scene(TILE, dest, chunk=16, progress=crash)
    with pytest.raises(WriteError, match="interrupted ingest of another source"):
        ingest_scene(BERLIN, dest, chunk=16)
    ingest_scene(BERLIN, dest, chunk=16, overwrite=True)
    _assert_same_scene(open_scene(BERLIN), open_zarr_scene(dest))


def test_existing_destination_and_overwrite(tmp_path: Path) -> None:
    dest = ingest_scene(BERLIN, tmp_path / "b.zarr", chunk=4)
    with pytest.raises(WriteError, match=r"destination '.*b\.zarr' exists.*overwrite=True"):
        ingest_scene(BERLIN, dest, chunk=4)
    ingest_scene(TILE, dest, chunk=8, overwrite=True)
    assert open_zarr_scene(dest).shape == (224, 32, 32)
    # overwrite never deletes a folder that is not a zarr store
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.tex").write_text("do not delete")
    with pytest.raises(WriteError, match="not a zarr store; refusing to delete"):
        ingest_scene(BERLIN, folder, overwrite=True)
    assert (folder / "thesis.tex").exists()


def test_envi_big_endian_bil_round_trip(tmp_path: Path) -> None:
    from tests.pipeline.test_readers import gamsberg_raw

    p = write_envi(tmp_path / "g.bil", gamsberg_raw(), interleave="bil", byte_order=1)
    back = _reopen(_ingest(p, tmp_path / "g.zarr", chunk=7))
    np.testing.assert_array_equal(back.values, gamsberg_raw() / np.float32(10000))


def test_bad_chunk_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chunk must be a positive integer"):
        ingest_scene(TILE, tmp_path / "x.zarr", chunk=0)
    assert not (tmp_path / "x.zarr").exists()
