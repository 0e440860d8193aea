"""Blending tile outputs: exactness, determinism, one writer per chunk, seams with the real denoiser."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline import tiles as ts
from pipeline.blend import BlendTarget, blend_stage, blend_window, chunk_windows
from pipeline.errors import GridError, ProvenanceError
from pipeline.grid import Window, plan_grid
from pipeline.runner import run_tiles
from pipeline.scene import good_band_index, valid_mask
from tests.pipeline.test_tiles import BoxFilter, real_crop


class ReverseExecutor(Executor):
    """Runs submitted tasks in *reverse* submission order, once submissions go quiet (tests only)."""

    def __init__(self) -> None:
        self._pending: list[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = []
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        f: Future[Any] = Future()
        with self._lock:
            self._pending.append((f, fn, args))
            self._last = time.monotonic()
        return f

    def _loop(self) -> None:
        while not self._stop:
            time.sleep(0.02)
            with self._lock:
                if not self._pending or time.monotonic() - self._last < 0.1:
                    continue
                batch, self._pending = self._pending[::-1], []
            for f, fn, args in batch:
                try:
                    f.set_result(fn(*args))
                except Exception as exc:  # pragma: no cover - surfaced through the future
                    f.set_exception(exc)

    def shutdown(self, wait: bool = True, **kw: Any) -> None:
        self._stop = True


@pytest.fixture(scope="module")
def crop() -> xr.DataArray:
    return real_crop()


def _input_store(tmp: Path, crop: xr.DataArray, tile: int, halo: int) -> tuple[Path, Any]:
    valid = valid_mask(crop).values
    grid = plan_grid(crop.shape[1:], tile, halo, valid)
    p = ts.write_input_tiles(crop, grid, tmp / "in.zarr", bands=good_band_index(crop))
    ts.write_valid_mask(valid, p, tile)
    return p, grid


def _target(tmp: Path, name: str, n: int, shape: tuple[int, int], chunk: int) -> str:
    zarr.create_array(
        str(tmp / name),
        shape=(n, *shape),
        chunks=(n, chunk, chunk),
        dtype="float32",
        fill_value=np.nan,
    )
    return str(tmp / name)


def _run_and_blend(
    tmp: Path,
    store: Path,
    grid: Any,
    ex_model: Executor,
    ex_blend: Executor,
    batch: int,
    window: str,
    tag: str,
    model: Any = None,
) -> np.ndarray:
    n = len(ts.store_attrs(store)["band_index"])
    dest = ts.create_output_store(tmp / f"{tag}.zarr", grid, [str(i) for i in range(n)])
    res = run_tiles(ex_model, model or BoxFilter(), store, dest, grid, batch_size=batch)
    assert not res.failed
    out = _target(tmp, f"{tag}_out.zarr", n, grid.shape, grid.tile)
    blend_stage(
        ex_blend,
        dest,
        store,
        grid,
        [BlendTarget(out, tuple(range(n)), tuple(range(n)))],
        chunk=grid.tile,
        blend=window,
    )
    return np.asarray(zarr.open_array(out, mode="r")[...])


@pytest.mark.parametrize("window", ["hann", "uniform", "crop"])
def test_identity_model_blends_back_to_the_real_input_exactly(
    tmp_path: Path, crop: xr.DataArray, window: str
) -> None:
    from workers.infer import IdentityTileModel

    store, grid = _input_store(tmp_path, crop, 16, 5)
    with ThreadPoolExecutor(2) as ex:
        out = _run_and_blend(tmp_path, store, grid, ex, ex, 3, window, "id", IdentityTileModel())
    want = crop.values[good_band_index(crop)].copy()
    want[:, ~valid_mask(crop).values] = np.nan
    np.testing.assert_array_equal(out, want)
    assert np.isnan(out).any() and np.isfinite(out).any()  # the crop really holds nodata and data


def test_output_is_independent_of_worker_count_batching_and_completion_order(
    tmp_path: Path, crop: xr.DataArray
) -> None:
    store, grid = _input_store(tmp_path, crop, 16, 4)
    with ThreadPoolExecutor(1) as one:
        a = _run_and_blend(tmp_path, store, grid, one, one, 1, "hann", "a")
    rev = ReverseExecutor()
    with ThreadPoolExecutor(4) as four:
        b = _run_and_blend(tmp_path, store, grid, rev, four, 5, "hann", "b")
    rev.shutdown()
    assert a.tobytes() == b.tobytes()
    # and a real (non-identity) operator did run: the output differs from the input
    assert not np.array_equal(a, crop.values[good_band_index(crop)], equal_nan=True)


def test_each_chunk_is_written_by_exactly_one_task(tmp_path: Path, crop: xr.DataArray) -> None:
    store, grid = _input_store(tmp_path, crop, 16, 4)
    n = len(ts.store_attrs(store)["band_index"])
    with ThreadPoolExecutor(2) as ex:
        dest = ts.create_output_store(tmp_path / "m.zarr", grid, [str(i) for i in range(n)])
        run_tiles(ex, BoxFilter(), store, dest, grid)
        out = _target(tmp_path, "o.zarr", n, grid.shape, 16)
        recs = blend_stage(
            ex, dest, store, grid, [BlendTarget(out, tuple(range(n)), tuple(range(n)))], chunk=16
        )
    windows = [tuple(r["window"]) for r in recs]
    assert len(windows) == len(set(windows)) == len(chunk_windows(grid.shape, 16))
    with pytest.raises(GridError, match=r"chunked \(\*, 16, 16\)"):
        bad = _target(tmp_path, "bad.zarr", n, grid.shape, 8)
        with ThreadPoolExecutor(1) as ex:
            blend_stage(ex, dest, store, grid, [BlendTarget(bad, (0,), (0,))], chunk=16)


def test_failed_tile_leaves_nodata_not_a_silent_guess(tmp_path: Path) -> None:
    data = np.arange(2 * 20 * 20, dtype=np.float32).reshape(2, 20, 20)
    grid = plan_grid((20, 20), 10, 3)
    bad = grid.tiles[0].key
    ok = {t.key for t in grid.tiles} - {bad}
    out = blend_window(
        lambda t: data[(slice(None), *t.read.slices)], grid, Window(0, 20, 0, 20), "hann", ok
    )
    core = grid.tiles[0].core
    # pixels only the failed tile covers are NaN; its core pixels inside neighbours' halos are still blended
    assert np.isnan(out[:, : core.y1 - 3, : core.x1 - 3]).all()
    np.testing.assert_array_equal(out[:, 10:, 10:], data[:, 10:, 10:])


def test_tile_not_matching_its_recorded_checksum_is_refused(tmp_path: Path) -> None:
    data = np.arange(2 * 20 * 20, dtype=np.float32).reshape(2, 20, 20)
    grid = plan_grid((20, 20), 10, 3)
    read = lambda t: data[(slice(None), *t.read.slices)]  # noqa: E731
    sums = {t.key: ts.tile_checksum(read(t)) for t in grid.tiles}
    win = Window(0, 20, 0, 20)
    np.testing.assert_array_equal(
        blend_window(read, grid, win, "hann", checksums=sums), blend_window(read, grid, win, "hann")
    )
    rotten = grid.tiles[2].key
    with pytest.raises(
        ProvenanceError, match=f"refusing to blend tile '{rotten}'.*Rerun the same command"
    ):
        blend_window(read, grid, win, "hann", checksums={**sums, rotten: "0" * 64})
    with pytest.raises(ProvenanceError, match="no checksum is recorded"):
        blend_window(
            read, grid, win, "hann", checksums={k: v for k, v in sums.items() if k != rotten}
        )


# ---------------------------------------------------------------------------- real denoiser seams
def _real_denoiser() -> Any:
    from pipeline.errors import WeightsError

    try:
        from workers.denoise.api import load_denoiser

        return load_denoiser("cpu")
    except (WeightsError, ImportError) as exc:
        pytest.skip(f"DECSC weights not available: {exc}")


def _seam_energy(x: np.ndarray, borders: list[int]) -> tuple[float, float]:
    """Mean squared horizontal difference across the given column borders, and across all other columns."""
    d = np.diff(x, axis=2) ** 2  # d[..., j] is between columns j and j+1
    cols = np.zeros(d.shape[2], bool)
    cols[[b - 1 for b in borders]] = True
    return float(np.nanmean(d[:, :, cols])), float(np.nanmean(d[:, :, ~cols]))


@pytest.mark.slow
def test_real_denoiser_blended_tiles_beat_crop_stitching_and_leave_no_seams(tmp_path: Path) -> None:
    import torch

    from workers.denoise.api import denoise_cube
    from workers.infer import DenoiseTileModel

    torch.set_num_threads(2)
    model = _real_denoiser()
    # 64x64 px, all bands: 2x2 tiles of 32 px with the model's own halo (16 px). With halo 8 the
    # 2026-11-27 weights' edge effect reaches past the halo and Hann blending was worse than crop
    # stitching (RMSE vs whole 4.8e-4 vs 3.1e-4; the 2026-11-26 weights: 3.9e-4 vs 4.2e-4)
    crop = real_crop(0, 0, 64, 64)
    good = good_band_index(crop)
    cube = crop.values[good]
    # the model's own output on both sides: this is about the blend windows (the band guard's
    # scene-wide mix at blending is tested in tests/workers/test_run.py)
    whole, _ = denoise_cube(model, cube, guard="off")
    store, grid = _input_store(tmp_path, crop, 32, 16)
    tm = DenoiseTileModel.from_registry("cpu", guard=False)
    n = len(good)
    with ThreadPoolExecutor(1) as ex:
        dest = ts.create_output_store(tmp_path / "d.zarr", grid, [str(i) for i in range(n)])
        assert not run_tiles(ex, tm, store, dest, grid).failed
        outs = {}
        for window in ("hann", "crop"):
            tgt = _target(tmp_path, f"{window}.zarr", n, grid.shape, 32)
            blend_stage(
                ex,
                dest,
                store,
                grid,
                [BlendTarget(tgt, tuple(range(n)), tuple(range(n)))],
                chunk=32,
                blend=window,
            )
            outs[window] = np.asarray(zarr.open_array(tgt, mode="r")[...])
    err = {w: float(np.sqrt(np.nanmean((o - whole) ** 2))) for w, o in outs.items()}
    assert err["hann"] < err["crop"], err
    # seam check, normalised by content: border/interior gradient energy of the blended result
    # relative to the same ratio in the whole-scene result
    borders = [32]
    b_t, i_t = _seam_energy(outs["hann"], borders)
    b_w, i_w = _seam_energy(whole, borders)
    assert b_t / i_t <= 1.05 * (b_w / i_w), (b_t, i_t, b_w, i_w)
