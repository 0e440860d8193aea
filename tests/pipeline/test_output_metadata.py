"""Output metadata on real files (issue 23, items 12-13): what the input says survives into the
zarr and COG outputs: wavelengths, FWHM and their units, bad bands, reflectance scale,
acquisition time, CF units on x/y, WKT2, consolidated metadata."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyproj
import pytest
import rasterio
import xarray as xr
import zarr

from pipeline.writers import (
    create_output_zarr,
    mark_complete,
    spectral_band_metadata,
    update_output_attrs,
    write_cog,
)
from tests.pipeline.test_tiles import real_crop

# the real EnMAP crop: its GeoTIFF says start_time 2022-07-24T10:45:26 (UTC) and flags 6 bad bands
ACQUIRED = "2022-07-24T10:45:26Z"


@pytest.fixture(scope="module")
def crop() -> xr.DataArray:
    c = real_crop()
    assert c.attrs["start_time"] == "2022-07-24T10:45:26"
    assert int((~c["good_band"].values).sum()) == 6
    return c


@pytest.fixture(scope="module")
def denoised(tmp_path_factory: pytest.TempPathFactory, crop: xr.DataArray) -> Path:
    """A complete denoised.zarr written the way the pipeline writes it (template, region writes, marker)."""
    d = tmp_path_factory.mktemp("out") / "denoised.zarr"
    arrays = create_output_zarr(
        d,
        "denoised",
        crop,
        channel_dim="band",
        chunk=16,
        attrs={"model": "decsc"},
        channel_coords={k: crop[k].values for k in ("band", "wavelength", "fwhm", "good_band")},
    )
    arr = zarr.open_array(arrays["denoised"], mode="r+")
    for y in range(0, 48, 16):
        for x in range(0, 48, 16):
            arr[:, y : y + 16, x : x + 16] = crop.values[:, y : y + 16, x : x + 16]
    mark_complete(d, tiles_digest="abc")
    return d


def test_zarr_opens_without_warnings_and_carries_cf_metadata(
    denoised: Path, crop: xr.DataArray
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # xarray warns when a store has no consolidated metadata
        ds = xr.open_zarr(denoised)
    assert ds.attrs["hyperdeq_complete"] is True and ds.attrs["tiles_digest"] == "abc"
    assert ds.attrs["Conventions"].startswith("CF-")
    assert ds.attrs["acquisition_time"] == ACQUIRED == ds.attrs["time_coverage_start"]
    assert ds.attrs["source_scale_factor"] == 10000.0
    assert ds.attrs["wavelength_units"] == "nm"
    assert ds.attrs["bad_bands"] == [int(i) for i in np.flatnonzero(~crop["good_band"].values)]
    assert ds["x"].attrs["units"] == "m" and ds["y"].attrs["units"] == "m"
    assert ds["x"].attrs["standard_name"] == "projection_x_coordinate"
    assert ds["wavelength"].attrs["units"] == "nm" and ds["fwhm"].attrs["units"] == "nm"
    np.testing.assert_allclose(ds["wavelength"].values, crop["wavelength"].values)
    np.testing.assert_allclose(ds["fwhm"].values, crop["fwhm"].values)
    np.testing.assert_array_equal(ds["good_band"].values.astype(bool), crop["good_band"].values)
    v = ds["denoised"]
    assert v.attrs["units"] == "1" and "reflectance" in v.attrs["long_name"]
    np.testing.assert_array_equal(v.values, crop.values)


def test_zarr_crs_is_wkt2_and_rioxarray_reads_it(denoised: Path, crop: xr.DataArray) -> None:
    ds = xr.open_zarr(denoised, decode_coords="all")
    wkt2 = ds.attrs["proj:wkt2"]
    assert wkt2.startswith("PROJCRS[") and "PROJCS[" not in wkt2  # WKT2, not GDAL's WKT1
    assert pyproj.CRS.from_wkt(wkt2).to_epsg() == 32633
    assert ds.attrs["proj:code"] == "EPSG:32633"
    assert ds["spatial_ref"].attrs["crs_wkt"] == wkt2  # CF grid mapping: WKT2 too
    assert ds["denoised"].rio.crs == crop.rio.crs
    assert ds["denoised"].rio.transform() == crop.rio.transform()
    # plain open_zarr (decode_coords=True) too
    assert xr.open_zarr(denoised).rio.crs == crop.rio.crs


def test_consolidated_metadata_follows_attribute_updates(denoised: Path) -> None:
    update_output_attrs(denoised, {"hyperdeq_run": {"run_id": "r1", "status": "complete"}})
    g = zarr.open_consolidated(str(denoised))
    assert g.attrs["hyperdeq_run"]["run_id"] == "r1" and g.attrs["hyperdeq_complete"] is True
    # the consolidated copy names every array with its attributes
    meta = g.metadata.consolidated_metadata
    assert meta is not None and {"denoised", "wavelength", "x", "y"} <= set(meta.metadata)
    assert xr.open_zarr(denoised).attrs["hyperdeq_run"]["run_id"] == "r1"


def test_cog_carries_wavelengths_bad_bands_scale_and_time(
    tmp_path: Path, denoised: Path, crop: xr.DataArray
) -> None:
    tif = write_cog(
        denoised / "denoised",
        tmp_path / "denoised.tif",
        crop,
        block=16,
        tags={"hyperdeq_run": "r1"},
        **spectral_band_metadata(crop),
    )
    wl, fw = crop["wavelength"].values, crop["fwhm"].values
    good = crop["good_band"].values
    with rasterio.open(tif) as f:
        tags = f.tags()
        assert tags["acquisition_time"] == ACQUIRED and tags["hyperdeq_run"] == "r1"
        assert float(tags["source_scale_factor"]) == 10000.0 and tags["wavelength_units"] == "nm"
        assert json.loads(tags["bad_bands"]) == [int(i) for i in np.flatnonzero(~good)]
        assert f.units == ("1",) * 224
        for b in (0, int(np.flatnonzero(~good)[0]), 223):
            t = f.tags(b + 1)
            assert float(t["wavelength"]) == pytest.approx(wl[b], abs=1e-4)
            assert float(t["fwhm"]) == pytest.approx(fw[b], abs=1e-4)
            assert t["wavelength_units"] == "nm"
            assert int(t["bbl"]) == int(t["good_band"]) == int(good[b])
            assert float(f.tags(b + 1, ns="IMAGERY")["CENTRAL_WAVELENGTH_UM"]) == pytest.approx(
                wl[b] / 1000, abs=1e-6
            )
            assert (f.descriptions[b].endswith("(bad band)")) == (not good[b])
            assert f"{wl[b]:.2f} nm" in f.descriptions[b]
        assert not any(s != 1.0 for s in f.scales)  # values are physical already: no GDAL scale
    # hyperdeq's own reader takes the output back with the same bands, flags and time
    from pipeline.readers import open_scene

    back = open_scene(tif)
    np.testing.assert_allclose(back["wavelength"].values, wl, atol=1e-4)
    np.testing.assert_allclose(back["fwhm"].values, fw, atol=1e-4)
    np.testing.assert_array_equal(back["good_band"].values, good)
    assert back.attrs["start_time"] == ACQUIRED
    assert back.attrs["source_scale_factor"] == 1.0  # [0, 1] reflectance: nothing to divide out


def test_abundance_cog_has_scene_tags_without_spectral_ones(
    tmp_path: Path, crop: xr.DataArray
) -> None:
    arrays = create_output_zarr(
        tmp_path / "ab.zarr",
        "abundances",
        crop,
        channel_dim="endmember",
        chunk=16,
        channel_coords={"endmember": np.array(["soil", "tree"], dtype=object)},
        extra=[("rmse", None, None)],
    )
    zarr.open_array(arrays["abundances"], mode="r+")[...] = 0.5
    tif = write_cog(
        arrays["abundances"], tmp_path / "ab.tif", crop, descriptions=["soil", "tree"], block=16
    )
    with rasterio.open(tif) as f:
        assert f.descriptions == ("soil", "tree")
        assert f.tags()["acquisition_time"] == ACQUIRED
        assert "wavelength" not in f.tags(1)
    ds = xr.open_zarr(tmp_path / "ab.zarr")
    assert ds["abundances"].attrs["units"] == "1" and ds["rmse"].attrs["units"] == "1"
    assert ds.attrs["acquisition_time"] == ACQUIRED
