"""The physical-range policy (``REFLECTANCE_RANGE``) in the raw -> canonical conversion and the ingest,
and the per-chunk checksum helpers (``pipeline.chunk_checksums``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr

from pipeline.chunk_checksums import ChunkChecksumError, bad_chunk, compressors, read_checked
from pipeline.ingest import ingest_scene, store_metadata
from pipeline.readers._base import REFLECTANCE_RANGE, to_canonical
from tests.pipeline.test_readers import TILE


def test_values_outside_the_range_become_nan_and_are_counted_per_band() -> None:
    raw = np.array([[[-5001, -5000, 0, 20000, 20001]], [[30000, -32768, 7, 8, 9]]], dtype=np.int16)
    oor = np.zeros(2, np.int64)
    out = to_canonical(raw, nodata=-32768, scale_factor=10000.0, out_of_range=oor)
    assert REFLECTANCE_RANGE == (-0.5, 2.0)
    np.testing.assert_array_equal(
        np.isnan(out[0, 0]), [True, False, False, False, True]
    )  # bounds kept
    np.testing.assert_array_equal(np.isnan(out[1, 0]), [True, True, False, False, False])
    assert oor.tolist() == [2, 1]  # the nodata value is nodata, not out of range


def test_float_fill_values_nan_and_inf() -> None:
    raw = np.array([[[-3e38, -1.23e34, np.nan, np.inf, 0.25]]], dtype=np.float32)
    oor = np.zeros(1, np.int64)
    out = to_canonical(raw.copy(), nodata=None, scale_factor=1.0, out_of_range=oor, copy=False)
    assert oor.tolist() == [2]
    assert (
        np.isnan(out[0, 0, :3]).all()
        and np.isinf(out[0, 0, 3])
        and out[0, 0, 4] == np.float32(0.25)
    )
    # without a range (a caller that wants raw values) nothing is changed
    same = to_canonical(raw, nodata=None, scale_factor=1.0, valid_range=None)
    assert same[0, 0, 0] == np.float32(-3e38)


def test_out_of_range_counts_survive_an_interrupted_ingest(tmp_path: Path) -> None:
    src = tmp_path / "tile.tif"
    with rasterio.open(TILE) as s:
        cube, profile = s.read(), s.profile
        tags, btags = s.tags(), [s.tags(i) for i in range(1, s.count + 1)]
    cube[5, 0, 0] = 1e6  # region 0
    cube[9, 31, 31] = -3e38  # the last region
    cube[9, 30, 31] = 5e4
    with rasterio.open(src, "w", **profile) as d:
        d.write(cube)
        d.update_tags(**tags)
        for i, t in enumerate(btags, 1):
            d.update_tags(i, **t)

    class Crash(RuntimeError):
        pass

    def crash(done: int, total: int) -> None:
        if done == 3:
            raise Crash

    with pytest.raises(Crash):
        ingest_scene(src, tmp_path / "r.zarr", chunk=11, progress=crash)
    ingest_scene(src, tmp_path / "r.zarr", chunk=11)
    whole = ingest_scene(src, tmp_path / "w.zarr", chunk=11)
    resumed, once = store_metadata(tmp_path / "r.zarr"), store_metadata(whole)
    want = [0] * cube.shape[0]
    want[5], want[9] = 1, 2
    assert once["out_of_range_per_band"] == want and resumed["out_of_range_per_band"] == want
    assert resumed["valid_pixels"] == once["valid_pixels"] == 32 * 32 - 3


def test_read_checked_names_the_chunk(tmp_path: Path) -> None:
    arr = zarr.create_array(
        str(tmp_path / "a.zarr"),
        shape=(3, 8, 8),
        chunks=(3, 4, 4),
        dtype="float32",
        compressors=compressors(),
        fill_value=np.nan,
    )
    arr[...] = np.arange(192, dtype=np.float32).reshape(3, 8, 8)
    f = tmp_path / "a.zarr" / "c" / "0" / "1" / "0"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 1
    f.write_bytes(bytes(b))
    arr = zarr.open_array(str(tmp_path / "a.zarr"), mode="r")
    assert bad_chunk(arr) is not None and bad_chunk(arr)[0] == (0, 1, 0)
    np.testing.assert_array_equal(
        read_checked(arr, (slice(None), slice(0, 4)), store="s", array="a", fix="x."),
        np.arange(192, dtype=np.float32).reshape(3, 8, 8)[:, :4],
    )
    with pytest.raises(
        ChunkChecksumError,
        match=r"chunk 'c/0/1/0' \(index \(0, 1, 0\), elements \[0:3, 4:8, 0:4\]\) "
        r"of array 'a' in zarr store 's' fails its crc32c checksum .*; re-ingest\.",
    ):
        read_checked(
            arr, (slice(None), slice(2, 6), slice(1, 3)), store="s", array="a", fix="re-ingest."
        )


def test_all_nan_band_of_a_mat_cube_becomes_a_bad_band(tmp_path: Path) -> None:
    import scipy.io

    from pipeline.readers import open_scene
    from tests.pipeline.test_readers import PAVIA

    cube = scipy.io.loadmat(PAVIA)["paviaU_subimg"].astype(np.float32)  # (rows, cols, bands), x10^4
    cube[:, :, 4] = np.nan
    cube[3, 3, 7] = 1e6  # one hot value: nodata, counted
    scipy.io.savemat(tmp_path / "p.mat", {"paviaU_subimg": cube})
    da = open_scene(tmp_path / "p.mat", scale_factor=10000.0)
    assert not bool(da["good_band"].values[4]) and int(da["good_band"].values.sum()) == 102
    assert da.attrs["nodata_bands"] == [4] and da.attrs["out_of_range_per_band"][7] == 1
    assert np.isnan(da.values[7, 3, 3]) and np.isfinite(da.values[6]).all()


def test_coordinate_arrays_of_the_ingested_store_are_checksummed(tmp_path: Path) -> None:
    import json
    import shutil

    from pipeline.errors import ReadError
    from pipeline.ingest import open_zarr_scene

    store = ingest_scene(TILE, tmp_path / "s.zarr")
    for name in ("reflectance", "wavelength", "good_band", "x", "y"):
        codecs = [c["name"] for c in json.loads((store / name / "zarr.json").read_text())["codecs"]]
        assert codecs[-1] == "crc32c", (name, codecs)
    copy = Path(shutil.copytree(store, tmp_path / "copy.zarr"))
    f = copy / "wavelength" / "c" / "0"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 4
    f.write_bytes(bytes(b))
    with pytest.raises(
        ReadError,
        match=r"the 'wavelength' array of zarr store '.*copy\.zarr' fails its crc32c "
        r"checksum .*ingest the source again",
    ):
        open_zarr_scene(copy)


def test_reingesting_a_damaged_store_names_the_chunk(tmp_path: Path) -> None:
    """A hyperdeq store read as a source (re-ingest, open_source): the checksum error keeps its class."""
    import shutil

    store = ingest_scene(TILE, tmp_path / "s.zarr", chunk=16)
    copy = Path(shutil.copytree(store, tmp_path / "copy.zarr"))
    f = copy / "reflectance" / "c" / "0" / "1" / "1"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 8
    f.write_bytes(bytes(b))
    with pytest.raises(
        ChunkChecksumError,
        match=r"zarr store '.*copy\.zarr'.*chunk reflectance/c/0/1/1 fails its "
        r"crc32c checksum",
    ):
        ingest_scene(copy, tmp_path / "again.zarr")
