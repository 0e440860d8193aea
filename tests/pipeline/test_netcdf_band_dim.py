"""NetCDF/HDF5 (and xarray zarr) cubes whose dims have no recognised names: which is the band axis?

The cube is a real ROSIS Pavia crop (tests/data): 103 bands over 16 × 24 px, so it has more
bands than rows. The old rule ("the smallest dim is the band axis") read it as 16 bands × 103
rows without a word; now the reader refuses to guess, says how to name the band axis with
``dims=``, and still finds the band axis by itself where the file says it (a wavelength
coordinate, or y/x named so that one dim is left).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import xarray as xr

from pipeline.errors import InputValidationError
from pipeline.readers import open_scene
from tests.pipeline.test_readers import PAVIA

#: (band, y, x) raw counts of a real crop: more bands than rows
CUBE = np.ascontiguousarray(
    scipy.io.loadmat(PAVIA)["paviaU_subimg"][10:26, 5:29, :].transpose(2, 0, 1)
)
#: ROSIS: 103 bands from 430 nm, ~4 nm apart
WAVELENGTH = np.linspace(430.0, 838.0, CUBE.shape[0])
REFUSAL = (
    r"cannot tell which dim of variable 'cube' in '.*' is the band axis: its dims "
    r"\{'p': 103, 'q': 16, 'r': 24\} have no recognised names .*Pass dims=\(band_dim, y_dim, "
    r"x_dim\), e\.g\. dims=\('p', 'q', 'r'\) if 'p' is the band axis"
)


def _nc(tmp_path: Path, da: xr.DataArray, name: str = "cube.nc") -> Path:
    p = tmp_path / name
    da.to_dataset(name="cube").to_netcdf(p)
    return p


def _expected(cube: np.ndarray = CUBE) -> np.ndarray:
    return cube.astype(np.float32) / np.float32(10000)


def test_unnamed_dims_with_more_bands_than_rows_are_refused_not_misread(tmp_path: Path) -> None:
    p = _nc(tmp_path, xr.DataArray(CUBE, dims=("p", "q", "r")))
    with pytest.raises(InputValidationError, match=REFUSAL):
        open_scene(p)
    # the fix the message gives works, as a tuple or as a string like the zarr reader's layout=
    for dims in (("p", "q", "r"), "p, q, r"):
        scene = open_scene(p, dims=dims)
        assert scene.shape == (103, 16, 24)
        np.testing.assert_array_equal(scene.values, _expected())
    # bands last: the message's second example
    last = _nc(tmp_path, xr.DataArray(CUBE.transpose(1, 2, 0), dims=("p", "q", "r")), "last.nc")
    with pytest.raises(
        InputValidationError, match=r"or dims=\('r', 'p', 'q'\) if the bands are last"
    ):
        open_scene(last)
    np.testing.assert_array_equal(open_scene(last, dims=("r", "p", "q")).values, _expected())


def test_hdf5_phony_dims_are_refused_with_the_dims_hint(tmp_path: Path) -> None:
    p = tmp_path / "cube.h5"
    with h5py.File(p, "w") as f:
        f["cube"] = CUBE  # plain HDF5 dataset: no dimension scales, so h5netcdf names phony dims
    with pytest.raises(
        InputValidationError,
        match=r"\{'phony_dim_0': 103, 'phony_dim_1': 16, 'phony_dim_2': 24\}.*Pass dims=",
    ):
        open_scene(p)
    scene = open_scene(p, dims=("phony_dim_0", "phony_dim_1", "phony_dim_2"))
    np.testing.assert_array_equal(scene.values, _expected())


@pytest.mark.parametrize("band_last", [False, True])
def test_a_wavelength_coordinate_names_the_band_dim(tmp_path: Path, band_last: bool) -> None:
    cube = CUBE.transpose(1, 2, 0) if band_last else CUBE
    dims = ("q", "r", "p") if band_last else ("p", "q", "r")
    da = xr.DataArray(cube, dims=dims, coords={"wavelength": ("p", WAVELENGTH, {"units": "nm"})})
    scene = open_scene(_nc(tmp_path, da))
    assert scene.shape == (103, 16, 24) and scene.attrs["band_dim_from"] == "band metadata"
    np.testing.assert_array_equal(scene.values, _expected())
    np.testing.assert_allclose(scene["wavelength"].values, WAVELENGTH)


def test_named_y_and_x_leave_the_band_dim(tmp_path: Path) -> None:
    da = xr.DataArray(CUBE.transpose(1, 0, 2), dims=("row", "d", "col"))
    scene = open_scene(_nc(tmp_path, da))
    np.testing.assert_array_equal(scene.values, _expected())


def test_xarray_zarr_with_unnamed_dims_is_refused_too(tmp_path: Path) -> None:
    """Not handed on to the bare-array reader, which would assume (band, y, x) silently."""
    p = tmp_path / "other.zarr"
    xr.DataArray(CUBE.transpose(1, 2, 0), dims=("p", "q", "r")).to_dataset(name="cube").to_zarr(
        p, zarr_format=3, consolidated=False
    )
    with pytest.raises(
        InputValidationError, match=r"is the band axis: its dims \{'p': 16, 'q': 24, 'r': 103\}"
    ):
        open_scene(p)
    np.testing.assert_array_equal(open_scene(p, dims=("r", "p", "q")).values, _expected())


def test_ingest_and_info_commands_take_dims(tmp_path: Path) -> None:
    """The refusal names the command-line fix, and `hyperdeq ingest|info --dims` applies it."""
    from typer.testing import CliRunner

    from flows.cli import app
    from pipeline.readers import open_scene as open_any

    p = _nc(tmp_path, xr.DataArray(CUBE, dims=("p", "q", "r")))
    res = CliRunner().invoke(app, ["ingest", str(p), str(tmp_path / "no.zarr")])
    assert res.exit_code != 0 and "--dims 'p,q,r'" in str(res.output) + str(res.exception)
    assert not (tmp_path / "no.zarr").exists()
    res = CliRunner().invoke(app, ["ingest", str(p), str(tmp_path / "s.zarr"), "--dims", "p,q,r"])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(open_any(tmp_path / "s.zarr").values, _expected())
    res = CliRunner().invoke(app, ["info", str(p), "--dims", "p,q,r", "--json"])
    assert res.exit_code == 0, res.output
    import json

    assert json.loads(res.output)["shape"][0] == 103
