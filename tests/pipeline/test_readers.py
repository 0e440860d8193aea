"""Readers on the real files shipped in tests/data (and variants derived from them at test time)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import dask.array as dsk
import h5py
import numpy as np
import pytest
import rasterio
import scipy.io
import xarray as xr

from pipeline.errors import ConfigError, InputValidationError
from pipeline.readers import FORMATS, detect_format, open_scene, open_source
from pipeline.readers.envi import parse_header, write_envi_header
from pipeline.scene import MissingCRSWarning

DATA = Path(__file__).resolve().parents[1] / "data"
TILE = DATA / "enmap_potsdam_tile" / "enmap_potsdam_tile_128_0.tif"
BERLIN = DATA / "enmap_berlin_tiny" / "enmap.tif"
GAMSBERG = DATA / "engeomap_gamsberg" / "cubus_gamsberg_subset"
PAVIA = DATA / "pavia_u_sub" / "paviaU_subimg.mat"
DEMO = DATA / "demo" / "enmap_potsdam_mosaic_18tiles.tif"


# -- helpers shared with the ingest / bad-input tests ------------------------------------------
def gamsberg_raw() -> np.ndarray:
    """The Gamsberg cube as stored: (bands, lines, samples) float32 little-endian."""
    return np.fromfile(GAMSBERG, dtype="<f4").reshape(189, 25, 10)


def gamsberg_header() -> dict[str, str]:
    return parse_header(GAMSBERG.with_suffix(".hdr").read_text())


def write_envi(
    path: Path,
    cube: np.ndarray,
    *,
    interleave: str = "bsq",
    byte_order: int = 0,
    offset: int = 0,
    data_type: int | None = None,
    extra: dict[str, object] | None = None,
    keep_wavelengths: bool = True,
) -> Path:
    """Write ``cube`` (bands, lines, samples) as ENVI with the Gamsberg band metadata."""
    nb, nl, ns = cube.shape
    code = (
        data_type
        or {"float32": 4, "float64": 5, "int16": 2, "uint16": 12, "int32": 3, "uint8": 1}[
            str(cube.dtype)
        ]
    )
    arr = {"bsq": cube, "bil": cube.transpose(1, 0, 2), "bip": cube.transpose(1, 2, 0)}[interleave]
    arr = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<" if byte_order == 0 else ">"))
    with open(path, "wb") as f:
        f.write(b"\0" * offset)
        f.write(arr.tobytes())
    fields: dict[str, object] = {
        "samples": ns,
        "lines": nl,
        "bands": nb,
        "header offset": offset,
        "file type": "ENVI Standard",
        "data type": code,
        "interleave": interleave,
        "byte order": byte_order,
    }
    if keep_wavelengths:
        hdr = gamsberg_header()
        fields["wavelength units"] = "Nanometers"
        fields["wavelength"] = hdr["wavelength"].replace("\n", " ")
        fields["fwhm"] = hdr["fwhm"].replace("\n", " ")
    fields.update(extra or {})
    write_envi_header(Path(str(path) + ".hdr"), fields)
    return path


def quiet_open(path: Path, **kw: object) -> xr.DataArray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingCRSWarning)
        return open_scene(path, **kw)


# -- GeoTIFF ----------------------------------------------------------------------------------
def test_formats_registry_lists_every_reader() -> None:
    assert set(FORMATS) == {"geotiff", "envi", "netcdf", "mat", "zarr"}


def test_geotiff_potsdam_tile_canonical() -> None:
    da = open_scene(TILE)
    assert da.dims == ("band", "y", "x") and da.shape == (224, 32, 32)
    assert isinstance(da.data, dsk.Array), "GeoTIFF scenes must be lazy"
    assert da.dtype == np.float32
    assert da.attrs["reader"] == "geotiff" and da.attrs["source_scale_factor"] == 10000.0
    assert da.attrs["scale_factor_source"] == "GDAL scale tag"
    assert da.rio.crs.to_epsg() == 32633
    assert tuple(da.rio.transform())[:6] == (30.0, 0.0, 366015.0, 0.0, -30.0, 5809965.0)
    wl = da["wavelength"].values
    assert (
        np.all(np.diff(wl) > 0)
        and wl[0] == pytest.approx(418.24)
        and wl[-1] == pytest.approx(2445.53)
    )
    assert np.isfinite(da["fwhm"].values).all()
    # EnMAP VNIR and SWIR overlap: bands are merged in wavelength order, the original order kept
    order = np.asarray(da.attrs["source_band_order"])
    with rasterio.open(TILE) as src:
        raw = src.read()
        bbl = np.array([src.tags(i + 1)["bbl"] == "1" for i in range(src.count)])
        wl_src = np.array([float(src.tags(i + 1)["wavelength"]) for i in range(src.count)])
    np.testing.assert_array_equal(wl, wl_src[order])
    np.testing.assert_array_equal(da["good_band"].values, bbl[order])
    assert (~da["good_band"].values).sum() == 6
    expected = raw[order].astype(np.float32) / np.float32(10000)
    expected[raw[order] == -32768] = np.nan
    np.testing.assert_array_equal(da.values, expected)
    # the bad bands are nodata in EnMAP L2A
    assert np.isnan(da.values[~da["good_band"].values]).all()


def test_plain_xarray_roundtrip_does_not_rescale(tmp_path: Path) -> None:
    """A scene saved with xarray's own to_zarr/to_netcdf reads back with the same values.

    The scale factor the reader divided out must not sit in a ``scale_factor`` attribute: xarray's
    CF decoding would multiply the physical values by it again (reflectance x 10^4).
    """
    da = open_scene(TILE).load()
    assert "scale_factor" not in da.attrs and "add_offset" not in da.attrs
    plain = da.drop_vars("spatial_ref").to_dataset(name="cube")
    for k, v in list(plain.attrs.items()) + list(plain["cube"].attrs.items()):
        if not isinstance(v, (str, int, float, np.number)):
            plain.attrs.pop(k, None)
            plain["cube"].attrs.pop(k, None)
    plain.to_zarr(tmp_path / "plain.zarr", mode="w")
    back = xr.open_zarr(tmp_path / "plain.zarr")["cube"].values
    np.testing.assert_array_equal(back, da.values)


def test_geotiff_berlin_aux_xml_micrometres_and_int16_scaling() -> None:
    da = open_scene(BERLIN)
    assert da.shape == (177, 7, 10)
    assert da["wavelength"].values[0] == pytest.approx(460.0)  # 0.46 µm in the .aux.xml
    assert da["wavelength"].values[-1] == pytest.approx(2409.0)
    assert (
        da.attrs["source_scale_factor"] == 10000.0 and "integer" in da.attrs["scale_factor_source"]
    )
    assert da.attrs["source_nodata"] == -9999.0
    with rasterio.open(BERLIN) as src:
        raw = src.read()
    np.testing.assert_array_equal(da.values, raw.astype(np.float32) / np.float32(10000))
    assert 0.0 < float(da.max()) < 1.0


def test_geotiff_explicit_scale_factor_option() -> None:
    da = open_scene(BERLIN, scale_factor=20000.0)  # overrides the x10^4 integer convention
    assert (
        da.attrs["source_scale_factor"] == 20000.0 and da.attrs["scale_factor_source"] == "option"
    )
    with rasterio.open(BERLIN) as src:
        raw = src.read()
    want = np.where(raw == -9999, np.nan, raw.astype(np.float32) / np.float32(20000))
    np.testing.assert_array_equal(da.values, want)


def test_demo_mosaic_float_reflectance_x10000_inferred() -> None:
    da = open_scene(DEMO)
    assert da.shape == (224, 192, 160)
    assert da.attrs["source_scale_factor"] == 10000.0 and da.attrs[
        "scale_factor_source"
    ].startswith("inferred")
    frac_nan = float(np.isnan(da.values).mean())
    assert 0.40 < frac_nan < 0.43  # 42 % nodata where no tile exists


def test_detection_by_content_not_extension(tmp_path: Path) -> None:
    odd = tmp_path / "scene.dat"
    shutil.copy(BERLIN, odd)
    assert detect_format(odd) == "geotiff"
    np.testing.assert_array_equal(open_scene(odd).values, open_scene(BERLIN).values)
    # an explicit format overrides detection (and aliases are accepted)
    assert open_source(odd, format="tif").reader == "geotiff"


def test_unknown_option_rejected() -> None:
    with pytest.raises(ConfigError, match=r"does not accept option\(s\) \['varaible'\]"):
        open_scene(TILE, varaible="x")


# -- ENVI ------------------------------------------------------------------------------------
def test_envi_gamsberg() -> None:
    with pytest.warns(MissingCRSWarning, match="has no CRS"):
        da = open_scene(GAMSBERG)
    assert da.shape == (189, 25, 10) and isinstance(da.data, dsk.Array)
    assert da.attrs["reader"] == "envi" and da.attrs["crs_missing"] is True
    assert da["wavelength"].values[0] == pytest.approx(426.820007)
    assert da["fwhm"].values[0] == pytest.approx(11.3871)  # nm like the wavelengths
    np.testing.assert_array_equal(da.values, gamsberg_raw() / np.float32(10000))
    # the .hdr path opens the same scene
    np.testing.assert_array_equal(quiet_open(GAMSBERG.with_suffix(".hdr")).values, da.values)


@pytest.mark.parametrize("interleave", ["bsq", "bil", "bip"])
@pytest.mark.parametrize("byte_order", [0, 1])
def test_envi_interleave_byte_order_offset(
    tmp_path: Path, interleave: str, byte_order: int
) -> None:
    cube = gamsberg_raw()
    p = write_envi(
        tmp_path / f"g_{interleave}", cube, interleave=interleave, byte_order=byte_order, offset=64
    )
    da = quiet_open(p)
    np.testing.assert_array_equal(da.values, cube / np.float32(10000))


def test_envi_map_info_units_scale_bbl_ignore_value(tmp_path: Path) -> None:
    cube = (gamsberg_raw() * 1.0).astype(np.float32)
    cube[:, 0, 0] = -1.0  # one nodata pixel
    hdr = gamsberg_header()
    wl_um = ", ".join(f"{float(v) / 1000:.9f}" for v in hdr["wavelength"].strip("{} \n").split(","))
    bbl = ["1"] * 189
    bbl[100] = "0"
    p = write_envi(
        tmp_path / "geo.bsq",
        cube,
        keep_wavelengths=False,
        extra={
            "wavelength units": "Micrometers",
            "wavelength": "{" + wl_um + "}",
            "reflectance scale factor": 10000,
            "data ignore value": -1,
            "bbl": "{" + ", ".join(bbl) + "}",
            "map info": "{UTM, 1.000, 1.000, 366015.000, 5809965.000, 30.000, 30.000, 33, North, WGS-84, units=Meters}",
        },
    )
    da = open_scene(p)
    assert da.rio.crs.to_epsg() == 32633
    assert tuple(da.rio.transform())[:6] == (30.0, 0.0, 366015.0, 0.0, -30.0, 5809965.0)
    assert da["x"].values[0] == 366015.0 + 15.0 and da["y"].values[0] == 5809965.0 - 15.0
    assert da["wavelength"].values[0] == pytest.approx(426.820007, abs=1e-4)
    assert da.attrs["scale_factor_source"] == "ENVI 'reflectance scale factor'"
    assert not bool(da["good_band"].values[100]) and int((~da["good_band"].values).sum()) == 1
    assert np.isnan(da.values[:, 0, 0]).all()
    np.testing.assert_array_equal(da.values[:, 1:, :], cube[:, 1:, :] / np.float32(10000))


def test_envi_coordinate_system_string_wins(tmp_path: Path) -> None:
    wkt = rasterio.crs.CRS.from_epsg(25833).to_wkt()
    p = write_envi(
        tmp_path / "cs.bsq",
        gamsberg_raw(),
        extra={
            "map info": "{UTM, 1, 1, 366015, 5809965, 30, 30, 33, North, WGS-84}",
            "coordinate system string": "{" + wkt + "}",
        },
    )
    assert open_scene(p).rio.crs.to_epsg() == 25833


# -- MATLAB ----------------------------------------------------------------------------------
def test_mat_v5_pavia() -> None:
    with pytest.warns(MissingCRSWarning):
        da = open_scene(PAVIA)
    raw = scipy.io.loadmat(PAVIA)["paviaU_subimg"]  # (rows, cols, bands)
    assert da.shape == (103, 50, 50) and da.attrs["variable"] == "paviaU_subimg"
    np.testing.assert_array_equal(
        da.values, np.transpose(raw, (2, 0, 1)).astype(np.float32) / np.float32(10000)
    )


def test_mat_y_trap_column_major(tmp_path: Path) -> None:
    cube = scipy.io.loadmat(PAVIA)["paviaU_subimg"][:40, :30]  # (rows, cols, bands), not square
    rows, cols, bands = cube.shape
    # how MATLAB stores a (bands × pixels) matrix: pixels enumerated column-major
    y = cube.reshape(rows * cols, bands, order="F").T
    p = tmp_path / "unmix.mat"
    scipy.io.savemat(
        p, {"Y": y, "lines": np.uint8(rows), "cols": np.uint8(cols), "GT": np.ones((3, bands))}
    )
    da = quiet_open(p)
    assert da.attrs["variable"] == "Y" and "order='F'" in da.attrs["unfolded"]
    np.testing.assert_array_equal(
        da.values, np.transpose(cube, (2, 0, 1)).astype(np.float32) / np.float32(10000)
    )
    # rows/cols can be given when the file lacks them
    p2 = tmp_path / "bare.mat"
    scipy.io.savemat(p2, {"Y": y})
    np.testing.assert_array_equal(quiet_open(p2, rows=rows, cols=cols).values, da.values)


def test_mat_v73_hdf5(tmp_path: Path) -> None:
    cube = scipy.io.loadmat(PAVIA)["paviaU_subimg"]
    p = tmp_path / "v73.mat"
    with h5py.File(p, "w", userblock_size=512) as f:
        f.create_dataset(
            "paviaU", data=cube.T
        )  # MATLAB writes column-major: h5py sees it transposed
        f.create_dataset("wavelengths", data=np.linspace(0.43, 0.86, cube.shape[2])[None, :].T.T)
    with open(p, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test".ljust(116, b" "))
    assert detect_format(p) == "mat"
    da = quiet_open(p)
    np.testing.assert_array_equal(
        da.values, np.transpose(cube, (2, 0, 1)).astype(np.float32) / np.float32(10000)
    )
    assert da["wavelength"].values[0] == pytest.approx(430.0)  # µm inferred → nm


def test_mat_variable_option_and_ambiguity(tmp_path: Path) -> None:
    cube = scipy.io.loadmat(PAVIA)["paviaU_subimg"]
    p = tmp_path / "two.mat"
    scipy.io.savemat(p, {"a": cube, "b": cube[:, :, :50]})
    with pytest.raises(
        InputValidationError, match=r"several 3-D cubes \(\['a', 'b'\]\).*variable=<name>"
    ):
        quiet_open(p)
    assert quiet_open(p, variable="b").shape == (50, 50, 50)


def test_jasper_ridge_y_matches_reference(shared_data: Path) -> None:
    """The real Jasper file: abundances unfolded like Y equal the shipped S_GT maps."""
    path = shared_data / "jasper_ridge" / "Jasper.mat"
    da = quiet_open(path)
    assert da.shape == (198, 100, 100) and da.attrs["variable"] == "Y"
    a = quiet_open(path, variable="A", scale_factor=1.0)
    s_gt = scipy.io.loadmat(path)["S_GT"]
    np.testing.assert_allclose(a.values, np.transpose(s_gt, (2, 0, 1)).astype(np.float32))


# -- NetCDF / HDF5 and foreign zarr ----------------------------------------------------------
def _scene_dataset(da: xr.DataArray) -> xr.Dataset:
    out = da.load().copy()
    out.attrs = {}
    out["wavelength"].attrs["units"] = "nm"
    return out.to_dataset(name="radiance")


def test_netcdf_cf_grid_mapping(tmp_path: Path) -> None:
    da = open_scene(TILE)
    p = tmp_path / "tile.nc"
    _scene_dataset(da).to_netcdf(p)
    assert detect_format(p) == "netcdf"
    back = open_scene(p, scale_factor=1.0)
    assert back.attrs["reader"] == "netcdf"
    np.testing.assert_array_equal(back.values, da.values)
    assert back.rio.crs == da.rio.crs
    assert back.rio.transform() == da.rio.transform()
    np.testing.assert_array_equal(back["wavelength"].values, da["wavelength"].values)
    np.testing.assert_array_equal(back["good_band"].values, da["good_band"].values)
    # the same file through the HDF5 engine
    h5 = tmp_path / "tile.h5"
    shutil.copy(p, h5)
    np.testing.assert_array_equal(open_scene(h5, scale_factor=1.0).values, da.values)


def test_foreign_zarr_without_crs_is_readable_and_flagged(tmp_path: Path) -> None:
    raw = gamsberg_raw()
    p = tmp_path / "other_tool.zarr"
    xr.Dataset(
        {"cube": (("wavelength", "row", "col"), raw)},
        coords={"wavelength": np.linspace(426.8, 2324.9, 189)},
    ).to_zarr(p, zarr_format=3, consolidated=False)
    assert detect_format(p) == "zarr"
    with pytest.warns(MissingCRSWarning, match="has no CRS"):
        da = open_scene(p)
    assert da.attrs["crs_missing"] is True and da.attrs["foreign_zarr"] is True
    np.testing.assert_array_equal(da.values, raw / np.float32(10000))


def test_bare_zarr_array_from_another_tool(tmp_path: Path) -> None:
    import zarr

    raw = gamsberg_raw()
    p = tmp_path / "plain.zarr"
    z = zarr.create_array(p, shape=(25, 10, 189), chunks=(8, 8, 189), dtype="float32")
    z[:] = np.moveaxis(raw, 0, 2)  # (y, x, band), no dimension names, no CRS
    with pytest.warns(MissingCRSWarning):
        da = open_scene(p, layout="y,x,band")
    assert da.attrs["foreign_zarr"] is True and da.attrs["layout"] == "y, x, band"
    np.testing.assert_array_equal(da.values, raw / np.float32(10000))
    # without layout=, (band, y, x) is assumed and flagged as a guess
    p2 = tmp_path / "bandfirst.zarr"
    z2 = zarr.create_array(p2, shape=(189, 25, 10), chunks=(189, 8, 8), dtype="float32")
    z2[:] = raw
    da2 = open_scene(p2)
    assert da2.attrs["dims_guessed"] is True and da2.attrs["layout"] == "band, y, x"
    np.testing.assert_array_equal(da2.values, raw / np.float32(10000))
