"""Overlapping tile stores on a real EnMAP crop: layout, checksums, corruption detection, resume."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline import tiles as ts
from pipeline.errors import GridError, WriteError
from pipeline.grid import plan_grid
from pipeline.runner import run_tiles
from pipeline.scene import good_band_index, valid_mask

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "enmap_potsdam_mosaic_18tiles.tif"
# 48x48 px window of the demo mosaic that holds both real pixels and nodata holes
CROP = (48, 64, 48, 48)  # y0, x0, height, width


def real_crop(
    y0: int = CROP[0], x0: int = CROP[1], h: int = CROP[2], w: int = CROP[3]
) -> xr.DataArray:
    """A real EnMAP crop (all 224 bands) as a canonical in-memory scene."""
    from pipeline.readers import open_scene

    return open_scene(DEMO).isel(y=slice(y0, y0 + h), x=slice(x0, x0 + w)).load()


def write_crop_tif(
    dest: Path, y0: int = CROP[0], x0: int = CROP[1], h: int = CROP[2], w: int = CROP[3]
) -> Path:
    """Copy a window of the demo GeoTIFF (values, georeferencing, dataset and band tags) to ``dest``."""
    import rasterio
    from rasterio.windows import Window as RW

    with rasterio.open(DEMO) as src:
        win = RW(x0, y0, w, h)
        prof = src.profile | {
            "width": w,
            "height": h,
            "transform": src.window_transform(win),
            "tiled": False,
            "compress": "deflate",
        }
        prof.pop("blockxsize", None)
        prof.pop("blockysize", None)
        with rasterio.open(dest, "w", **prof) as dst:
            dst.write(src.read(window=win))
            dst.update_tags(**src.tags())
            for ns in src.tag_namespaces():
                if ns not in ("IMAGE_STRUCTURE", "DERIVED_SUBDATASETS"):
                    dst.update_tags(ns=ns, **src.tags(ns=ns))
            for b in range(1, src.count + 1):
                dst.update_tags(b, **src.tags(b))
                if src.descriptions[b - 1]:
                    dst.set_band_description(b, src.descriptions[b - 1])
    return dest


class BoxFilter:
    """A real local operator (3x3 mean per band, NaN-aware) used as a tile model with a known halo."""

    name = "box3"
    halo = 1
    weights_sha256 = None
    out_names = None

    def __call__(self, cube: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        from scipy.ndimage import uniform_filter

        fin = np.isfinite(cube)
        num = uniform_filter(
            np.where(fin, cube, 0).astype(np.float64), size=(1, 3, 3), mode="nearest"
        )
        den = uniform_filter(fin.astype(np.float64), size=(1, 3, 3), mode="nearest")
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (num / den).astype(np.float32)
        out[~fin] = np.nan
        return out, {"iterations": 1, "residual": 0.0, "converged": True}


@pytest.fixture(scope="module")
def crop() -> xr.DataArray:
    return real_crop()


@pytest.fixture
def store(tmp_path: Path, crop: xr.DataArray) -> tuple[Path, Any]:
    valid = valid_mask(crop).values
    grid = plan_grid(crop.shape[1:], 16, 4, valid)
    p = ts.write_input_tiles(crop, grid, tmp_path / "in.zarr", bands=good_band_index(crop))
    ts.write_valid_mask(valid, p, 16)
    return p, grid


def test_each_tile_is_one_chunk_holding_its_read_window(
    store: tuple[Path, Any], crop: xr.DataArray
) -> None:
    path, grid = store
    arr = zarr.open_array(str(path / "data"), mode="r")
    good = good_band_index(crop)
    assert arr.chunks == (1, len(good), 24, 24)  # tile 16 + 2 x halo 4
    assert ts.is_complete(path)
    sums = ts.store_attrs(path)["checksums"]
    for t in grid.tiles:
        got = ts.read_tile(path, grid, t)
        want = crop.values[good][(slice(None), *t.read.slices)]
        np.testing.assert_array_equal(got, want)
        assert sums[t.key] == ts.tile_checksum(want)
    assert ts.open_grid(path) == grid


def test_existing_store_is_not_overwritten(store: tuple[Path, Any], crop: xr.DataArray) -> None:
    path, grid = store
    with pytest.raises(
        WriteError, match=r"tile store .*in.zarr' already exists; pass overwrite=True"
    ):
        ts.write_input_tiles(crop, grid, path)
    with pytest.raises(
        GridError, match=r"scene shape \(48, 48\) does not match the grid shape \(40, 40\)"
    ):
        ts.write_input_tiles(crop, plan_grid((40, 40), 16, 4), path.with_name("other.zarr"))


def _corrupt_chunk(stage: Path, grid: Any, tile: Any, how: str) -> None:
    chunk = stage / "data" / "c" / str(grid.position(tile)) / "0" / "0" / "0"
    raw = chunk.read_bytes()
    if how == "truncate":
        chunk.write_bytes(raw[: len(raw) // 2])
    else:  # well-formed data with different values: only the checksum can tell
        arr = zarr.open_array(str(stage / "data"), mode="r+")
        block = np.asarray(arr[grid.position(tile)])
        block[0, 0, 0] += 1.0
        arr[grid.position(tile)] = block


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupted_tile_output_is_detected_and_recomputed(
    store: tuple[Path, Any], tmp_path: Path, how: str
) -> None:
    path, grid = store
    model = BoxFilter()
    dest = ts.create_output_store(tmp_path / "box.zarr", grid, [str(i) for i in range(218)])
    with ThreadPoolExecutor(2) as ex:
        first = run_tiles(ex, model, path, dest, grid, batch_size=2)
        assert all(r["status"] == "ok" for r in first.records) and len(first.records) == len(
            grid.tiles
        )
        victim = grid.tiles[1]
        _corrupt_chunk(dest, grid, victim, how)
        assert not ts.verify_tile(dest, grid, victim, first.records[1]["checksum"])
        second = run_tiles(ex, model, path, dest, grid, batch_size=2)
    recomputed = [r["key"] for r in second.records if not r.get("reused")]
    assert recomputed == [victim.key]
    assert ts.verify_tile(dest, grid, victim, second.records[1]["checksum"])
    assert second.records[1]["checksum"] == first.records[1]["checksum"]


def test_missing_or_unreadable_record_means_recompute(
    store: tuple[Path, Any], tmp_path: Path
) -> None:
    path, grid = store
    dest = ts.create_output_store(tmp_path / "box.zarr", grid, [str(i) for i in range(218)])
    with ThreadPoolExecutor(2) as ex:
        run_tiles(ex, BoxFilter(), path, dest, grid)
        rec_dir = ts.records_dir(dest)
        (rec_dir / f"{grid.tiles[0].key}.json").unlink()
        (rec_dir / f"{grid.tiles[2].key}.json").write_text("{not json")
        again = run_tiles(ex, BoxFilter(), path, dest, grid)
    assert sorted(r["key"] for r in again.records if not r.get("reused")) == sorted(
        [grid.tiles[0].key, grid.tiles[2].key]
    )
    assert (
        json.loads((ts.records_dir(dest) / f"{grid.tiles[2].key}.json").read_text())["status"]
        == "ok"
    )


def test_output_store_refuses_other_layout(store: tuple[Path, Any], tmp_path: Path) -> None:
    path, grid = store
    ts.create_output_store(tmp_path / "o.zarr", grid, ["a", "b"])
    with pytest.raises(WriteError, match=r"exists with other channels or grid"):
        ts.create_output_store(tmp_path / "o.zarr", grid, ["a", "b", "c"])


def test_wrong_model_output_shape_is_a_failed_tile_not_a_silent_write(
    store: tuple[Path, Any], tmp_path: Path
) -> None:
    path, grid = store

    class Shrinks(BoxFilter):
        def __call__(self, cube: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
            return cube[:, 1:, 1:], {}

    dest = ts.create_output_store(tmp_path / "s.zarr", grid, [str(i) for i in range(218)])
    with ThreadPoolExecutor(1) as ex:
        res = run_tiles(ex, Shrinks(), path, dest, grid)
    assert len(res.failed) == len(grid.tiles)
    assert "model output has shape" in res.failed[0]["error"]


def test_changed_input_or_weights_invalidate_tile_records(
    store: tuple[Path, Any], tmp_path: Path, crop: xr.DataArray
) -> None:
    path, grid = store
    dest = ts.create_output_store(tmp_path / "box.zarr", grid, [str(i) for i in range(218)])

    class Reweighted(BoxFilter):
        weights_sha256 = "f" * 64

    with ThreadPoolExecutor(2) as ex:
        run_tiles(ex, BoxFilter(), path, dest, grid)
        assert all(r.get("reused") for r in run_tiles(ex, BoxFilter(), path, dest, grid).records)
        assert not any(
            r.get("reused") for r in run_tiles(ex, Reweighted(), path, dest, grid).records
        )
        changed = crop.copy(data=crop.values * 2)
        ts.write_input_tiles(changed, grid, path, bands=good_band_index(crop), overwrite=True)
        again = run_tiles(ex, Reweighted(), path, dest, grid)
    assert not any(r.get("reused") for r in again.records)


def test_batches_never_reported_by_a_closed_client_are_cut_off_not_awaited(
    store: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the scheduler dies while results are being gathered, a Dask future can stay pending
    forever after its client closed; the runner must stop waiting and record those batches as
    cut off (the integration fault test kills a real scheduler; this pins the waiting logic)."""
    from concurrent.futures import Future

    import pipeline.runner as runner

    monkeypatch.setattr(runner, "_POLL_S", 0.05)
    path, grid = store

    class _Client:
        status = "running"

    class StallingExecutor(ThreadPoolExecutor):
        def __init__(self) -> None:
            super().__init__(1)
            self._client = _Client()
            self.n = 0

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:  # type: ignore[override]
            self.n += 1
            if self.n == 1:  # the first batch completes before the scheduler "dies"
                f = super().submit(fn, *args, **kwargs)
                f.result()
                return f
            self._client.status = "closed"
            return Future()  # never resolved

    dest = ts.create_output_store(tmp_path / "box.zarr", grid, [str(i) for i in range(218)])
    with StallingExecutor() as ex:
        res = run_tiles(ex, BoxFilter(), path, dest, grid, batch_size=2)
    ok = [r for r in res.records if r["status"] == "ok"]
    cut = [r for r in res.records if r["status"] != "ok"]
    assert len(ok) == 2 and len(cut) == len(grid.tiles) - 2
    assert all(
        r["error"].startswith("task failed: CancelledError: the Dask client closed") for r in cut
    )
