"""Bad input: every case raises the right error with a message that names the value and the fix."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import scipy.io
import xarray as xr

from pipeline.errors import (
    InputValidationError,
    ReadError,
    UnknownFormatError,
    WriteError,
)
from pipeline.ingest import ingest_scene, open_zarr_scene
from pipeline.readers import open_scene
from pipeline.scene import MissingCRSWarning
from tests.pipeline.test_readers import (
    BERLIN,
    DEMO,
    GAMSBERG,
    PAVIA,
    TILE,
    gamsberg_raw,
    write_envi,
)


@pytest.fixture(autouse=True)
def _no_crs_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingCRSWarning)
        yield


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(
        ReadError, match=r"input file not found: '.*nope\.tif'.*check the file name"
    ):
        open_scene(tmp_path / "nope.tif")
    with pytest.raises(ReadError, match=r"input file not found.*does not exist either"):
        ingest_scene(tmp_path / "no" / "dir" / "x.tif", tmp_path / "o.zarr")


def test_directory_given_as_file(tmp_path: Path) -> None:
    with pytest.raises(
        ReadError, match=r"is a directory, not a scene file.*give the path of the scene file"
    ):
        open_scene(tmp_path)
    with pytest.raises(ReadError, match=r"is a directory but format 'geotiff' reads files"):
        open_scene(tmp_path, format="geotiff")


def test_unknown_format(tmp_path: Path) -> None:
    p = tmp_path / "notes.xyz"
    p.write_text("not a raster")
    with pytest.raises(
        UnknownFormatError,
        match=r"unknown scene format for '.*notes\.xyz' \(extension '\.xyz'.*format=<one of these>",
    ):
        open_scene(p)
    with pytest.raises(
        UnknownFormatError, match=r"unknown format 'jpeg2000'; supported formats: \['envi'"
    ):
        open_scene(TILE, format="jpeg2000")


def test_text_file_named_tif_is_corrupt(tmp_path: Path) -> None:
    p = tmp_path / "fake.tif"
    p.write_text("hello")
    with pytest.raises(ReadError, match=r"cannot open GeoTIFF '.*fake\.tif'.*corrupt or truncated"):
        open_scene(p)


@pytest.mark.parametrize("src, frac", [(TILE, 0.6), (DEMO, 0.5)], ids=["stripped", "tiled"])
def test_truncated_geotiff(tmp_path: Path, src: Path, frac: float) -> None:
    data = src.read_bytes()
    p = tmp_path / "trunc.tif"
    p.write_bytes(data[: int(len(data) * frac)])
    with pytest.raises(
        ReadError, match=r"GeoTIFF '.*trunc\.tif'.*corrupt or truncated.*copy it again"
    ):
        open_scene(p)


def test_envi_header_data_size_mismatch(tmp_path: Path) -> None:
    p = write_envi(tmp_path / "g.bsq", gamsberg_raw())
    with open(p, "r+b") as f:
        f.truncate(189 * 25 * 10 * 4 - 1000)
    with pytest.raises(
        ReadError,
        match=r"has 188000 bytes but its header .* implies 189000.*truncated or the header is wrong",
    ):
        open_scene(p)


def test_envi_wrong_byte_order_declared_float(tmp_path: Path) -> None:
    p = write_envi(tmp_path / "g.bsq", gamsberg_raw(), byte_order=0)
    hdr = Path(str(p) + ".hdr")
    hdr.write_text(hdr.read_text().replace("byte order = 0", "byte order = 1"))
    with pytest.raises(
        InputValidationError,
        match=r"look byte-swapped.*'byte order = 1'.*Fix the header \('byte order = 0'\)",
    ):
        open_scene(p)


def test_envi_wrong_byte_order_declared_int16(tmp_path: Path) -> None:
    with rasterio.open(BERLIN) as src:
        cube = src.read()  # real int16 EnMAP spectra
    p = write_envi(tmp_path / "b.bsq", cube, byte_order=1, keep_wavelengths=False)
    assert open_scene(p).shape == (177, 7, 10)  # honest big-endian file reads fine
    hdr = Path(str(p) + ".hdr")
    hdr.write_text(hdr.read_text().replace("byte order = 1", "byte order = 0"))
    with pytest.raises(InputValidationError, match=r"look byte-swapped.*'byte order = 0'"):
        open_scene(p)


def test_inconsistent_wavelength_count(tmp_path: Path) -> None:
    p = write_envi(
        tmp_path / "g.bsq",
        gamsberg_raw(),
        keep_wavelengths=False,
        extra={"wavelength": "{" + ", ".join(str(400 + 10 * i) for i in range(188)) + "}"},
    )
    with pytest.raises(
        InputValidationError, match=r"wavelength has 188 values but the cube has 189 bands"
    ):
        open_scene(p)


def test_wavelengths_not_increasing(tmp_path: Path) -> None:
    wl = [2400 - 10 * i for i in range(189)]  # reversed: not a detector overlap, a broken header
    p = write_envi(
        tmp_path / "g.bsq",
        gamsberg_raw(),
        keep_wavelengths=False,
        extra={"wavelength": "{" + ", ".join(map(str, wl)) + "}"},
    )
    with pytest.raises(
        InputValidationError, match=r"wavelengths must be strictly increasing; band 1 \(.*2390"
    ):
        open_scene(p)
    dup = list(range(400, 400 + 189))
    dup[50] = dup[49]
    p2 = write_envi(
        tmp_path / "d.bsq",
        gamsberg_raw(),
        keep_wavelengths=False,
        extra={"wavelength": "{" + ", ".join(map(str, dup)) + "}"},
    )
    with pytest.raises(InputValidationError, match="strictly increasing"):
        open_scene(p2)


def test_zero_size(tmp_path: Path) -> None:
    p = write_envi(tmp_path / "z.bsq", np.zeros((189, 0, 10), np.float32))
    with pytest.raises(
        InputValidationError, match=r"zero-size raster: shape \(band, y, x\) = \(189, 0, 10\)"
    ):
        open_scene(p)
    with pytest.raises(InputValidationError, match="zero-size raster"):
        ingest_scene(p, tmp_path / "z.zarr")
    assert not (tmp_path / "z.zarr").exists()


def test_single_band(tmp_path: Path) -> None:
    p = write_envi(tmp_path / "one.bsq", gamsberg_raw()[:1], keep_wavelengths=False)
    with pytest.raises(InputValidationError, match=r"at least 2 bands, got 1.*single-band image"):
        open_scene(p)
    with rasterio.open(BERLIN) as src:
        profile = src.profile | {"count": 1}
        band = src.read(1)
    tif = tmp_path / "one.tif"
    with rasterio.open(tif, "w", **profile) as dst:
        dst.write(band, 1)
    with pytest.raises(InputValidationError, match="at least 2 bands, got 1"):
        open_scene(tif)


def test_non_numeric_dtype(tmp_path: Path) -> None:
    cube = gamsberg_raw().astype(np.complex64)
    p = write_envi(tmp_path / "c.bsq", cube, data_type=6)
    with pytest.raises(
        InputValidationError, match=r"non-numeric data type 'complex64'.*ENVI data type 6"
    ):
        open_scene(p)
    m = tmp_path / "s.mat"
    scipy.io.savemat(m, {"cube": np.full((4, 4, 3), 1 + 2j)})
    with pytest.raises(InputValidationError, match=r"non-numeric dtype 'complex128'"):
        open_scene(m, variable="cube")


def test_infinity_rejected_nan_kept_as_nodata(tmp_path: Path) -> None:
    cube = gamsberg_raw().copy()
    cube[:, 3, 4] = np.nan
    p = write_envi(tmp_path / "nan.bsq", cube)
    back = open_zarr_scene(ingest_scene(p, tmp_path / "nan.zarr", chunk=8))
    assert np.isnan(back.values[:, 3, 4]).all() and np.isfinite(back.values[:, 3, 5]).all()
    cube[7, 20, 9] = np.inf
    p2 = write_envi(tmp_path / "inf.bsq", cube)
    with pytest.raises(
        InputValidationError,
        match=r"infinite value inf .* band 7, row 20, col 9.*Mask them as nodata",
    ):
        ingest_scene(p2, tmp_path / "inf.zarr", chunk=8)
    assert not (tmp_path / "inf.zarr").exists()  # a rejected ingest leaves nothing behind


def test_all_nodata(tmp_path: Path) -> None:
    cube = np.full((189, 25, 10), -9999.0, np.float32)
    p = write_envi(tmp_path / "nd.bsq", cube, extra={"data ignore value": -9999})
    with pytest.raises(
        InputValidationError,
        match=r"all-nodata scene.*nodata value -9999\.0.*check the nodata value",
    ):
        ingest_scene(p, tmp_path / "nd.zarr", chunk=8)
    assert not (tmp_path / "nd.zarr").exists()


def test_integer_overflow_on_scaling(tmp_path: Path) -> None:
    with rasterio.open(BERLIN) as src:
        cube = src.read().astype(np.int32)
    p = write_envi(
        tmp_path / "o.bsq",
        cube,
        keep_wavelengths=False,
        extra={"reflectance scale factor": "1e-37"},
    )
    with pytest.raises(
        InputValidationError, match=r"overflow while scaling .* raw value \d+ .*scale factor 1e-37"
    ):
        ingest_scene(p, tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists()
    p0 = write_envi(
        tmp_path / "z.bsq", cube, keep_wavelengths=False, extra={"reflectance scale factor": "0"}
    )
    with pytest.raises(
        InputValidationError,
        match=r"scale factor from ENVI 'reflectance scale factor' must be a positive finite number, got 0\.0",
    ):
        open_scene(p0)


def test_mat_without_expected_variable(tmp_path: Path) -> None:
    with pytest.raises(
        InputValidationError,
        match=r"variable 'Y' not found in .*paviaU_subimg\.mat'; variables: paviaU_subimg \(50, 50, 103\) uint16",
    ):
        open_scene(PAVIA, variable="Y")
    p = tmp_path / "lib.mat"
    scipy.io.savemat(p, {"M": np.ones((103, 4)), "names": np.arange(4)})
    with pytest.raises(
        InputValidationError, match=r"no hyperspectral cube found .*variables: M \(103, 4\) float64"
    ):
        open_scene(p)
    p2 = tmp_path / "y.mat"
    scipy.io.savemat(p2, {"Y": np.ones((103, 600))})
    with pytest.raises(
        InputValidationError,
        match=r"2-D matrix \(103, 600\) but the file has no rows/cols.*pass rows=<n>, cols=<n>",
    ):
        open_scene(p2)


def test_foreign_zarr_without_crs_warns_and_is_flagged(tmp_path: Path) -> None:
    p = tmp_path / "other.zarr"
    xr.Dataset({"data": (("band", "y", "x"), gamsberg_raw())}).to_zarr(
        p, zarr_format=3, consolidated=False
    )
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        dest = ingest_scene(p, tmp_path / "ours.zarr", chunk=16)
    assert any(issubclass(w.category, MissingCRSWarning) for w in rec)
    back = open_zarr_scene(dest)
    assert back.attrs["crs_missing"] is True
    np.testing.assert_array_equal(back.values, gamsberg_raw() / np.float32(10000))


def test_unwritable_destination(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(
        WriteError, match=r"cannot write to '.*a_file/out\.zarr'.*choose a writable folder"
    ):
        ingest_scene(BERLIN, blocker / "out.zarr")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(WriteError, match="cannot write to"):
            ingest_scene(BERLIN, ro / "out.zarr")
    finally:
        ro.chmod(0o755)


def test_destination_exists(tmp_path: Path) -> None:
    dest = tmp_path / "taken.tif"
    shutil.copy(BERLIN, dest)
    with pytest.raises(
        WriteError, match=r"destination '.*taken\.tif' exists; pass overwrite=True \(--overwrite\)"
    ):
        ingest_scene(GAMSBERG, dest)
    assert dest.read_bytes() == BERLIN.read_bytes()


def test_incomplete_store_refused_by_open_scene(tmp_path: Path) -> None:
    dest = tmp_path / "half.zarr"

    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        if done == 1:
            raise Stop

    with pytest.raises(Stop):
        ingest_scene(TILE, dest, chunk=16, progress=stop)
    with pytest.raises(ReadError, match=r"is incomplete.*Re-run the same ingest command to resume"):
        open_scene(dest)
