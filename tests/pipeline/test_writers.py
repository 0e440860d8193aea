"""Writers: zarr template + region writes, COG, quicklooks; round trips against the real input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr
from PIL import Image

from pipeline.errors import WriteError
from pipeline.writers import (
    confined_path,
    create_output_zarr,
    mark_complete,
    open_output,
    quicklook_abundances,
    quicklook_rgb,
    rgb_bands,
    safe_name,
    write_cog,
)
from tests.pipeline.test_tiles import real_crop


@pytest.fixture(scope="module")
def crop() -> xr.DataArray:
    return real_crop()


def _bands(crop: xr.DataArray) -> dict[str, np.ndarray]:
    return {k: crop[k].values for k in ("band", "wavelength", "fwhm", "good_band")}


def test_zarr_output_round_trip_keeps_crs_transform_wavelengths_nodata(tmp_path: Path, crop: xr.DataArray) -> None:
    arrays = create_output_zarr(tmp_path / "denoised.zarr", "denoised", crop, channel_dim="band",
                                channel_coords=_bands(crop), chunk=16, attrs={"model": "test"})
    arr = zarr.open_array(arrays["denoised"], mode="r+")
    assert arr.chunks == (224, 16, 16)
    # before any region write the store is all nodata and not complete
    assert not zarr.open_group(str(tmp_path / "denoised.zarr")).attrs["hyperdeq_complete"]
    for y in range(0, 48, 16):
        for x in range(0, 48, 16):
            arr[:, y : y + 16, x : x + 16] = crop.values[:, y : y + 16, x : x + 16]
    mark_complete(tmp_path / "denoised.zarr")
    back = open_output(tmp_path / "denoised.zarr", "denoised")
    assert back.rio.crs == crop.rio.crs and back.rio.crs.to_epsg() == 32633
    assert back.rio.transform() == crop.rio.transform()
    assert back.shape == crop.shape and back.dims == ("band", "y", "x")
    np.testing.assert_array_equal(back["wavelength"].values, crop["wavelength"].values)
    np.testing.assert_array_equal(back["good_band"].values, crop["good_band"].values)
    np.testing.assert_array_equal(back.values, crop.values)  # NaN nodata where the input has it
    assert back.attrs.get("grid_mapping") == "spatial_ref" or back.encoding.get("grid_mapping") == "spatial_ref"
    g = zarr.open_group(str(tmp_path / "denoised.zarr")).attrs
    assert g["proj:code"] == "EPSG:32633" and g["hyperdeq_complete"] and g["model"] == "test"
    assert g["proj:transform"] == list(crop.rio.transform())[:6]
    with pytest.raises(WriteError, match=r"already exists; remove it or use a new run directory"):
        create_output_zarr(tmp_path / "denoised.zarr", "denoised", crop, channel_dim="band", chunk=16)


def test_abundance_zarr_with_endmember_names_and_2d_rmse(tmp_path: Path, crop: xr.DataArray) -> None:
    arrays = create_output_zarr(tmp_path / "ab.zarr", "abundances", crop, channel_dim="endmember",
                                channel_coords={"endmember": np.array(["soil", "tree", "water"], dtype=object)}, chunk=16,
                                extra=[("rmse", None, None)])
    assert zarr.open_array(arrays["rmse"]).shape == (48, 48)
    ab = open_output(tmp_path / "ab.zarr", "abundances")
    assert list(ab["endmember"].values) == ["soil", "tree", "water"]
    assert ab.rio.crs == crop.rio.crs
    rm = open_output(tmp_path / "ab.zarr", "rmse")
    assert rm.dims == ("y", "x") and rm.rio.transform() == crop.rio.transform()


def test_cog_round_trip(tmp_path: Path, crop: xr.DataArray) -> None:
    arrays = create_output_zarr(tmp_path / "d.zarr", "denoised", crop, channel_dim="band",
                                channel_coords=_bands(crop), chunk=16)
    zarr.open_array(arrays["denoised"], mode="r+")[...] = crop.values
    wl = crop["wavelength"].values
    tif = write_cog(arrays["denoised"], tmp_path / "denoised.tif", crop,
                    descriptions=[f"{w:.3f} nm" for w in wl], band_tags=[{"wavelength": w} for w in wl], block=16)
    with rasterio.open(tif) as f:
        assert f.crs == crop.rio.crs and f.transform == crop.rio.transform()
        assert (f.count, f.height, f.width) == crop.shape
        assert f.interleaving.name == "band" and f.profile["tiled"]
        assert np.isnan(f.nodata)
        assert f.overviews(1) == [2]
        assert float(f.tags(5)["wavelength"]) == pytest.approx(wl[4])
        assert f.descriptions[0] == f"{wl[0]:.3f} nm"
        np.testing.assert_array_equal(f.read(), crop.values)
    with pytest.raises(WriteError, match="already exists"):
        write_cog(arrays["denoised"], tif, crop)


def test_quicklooks(tmp_path: Path, crop: xr.DataArray) -> None:
    arrays = create_output_zarr(tmp_path / "d.zarr", "denoised", crop, channel_dim="band",
                                channel_coords=_bands(crop), chunk=16)
    zarr.open_array(arrays["denoised"], mode="r+")[...] = crop.values
    bands = rgb_bands(crop["wavelength"].values, crop["good_band"].values)
    assert [abs(crop["wavelength"].values[b] - t) < 10 for b, t in zip(bands, (640, 550, 460), strict=True)] == [True] * 3
    png = quicklook_rgb(arrays["denoised"], bands, tmp_path / "rgb.png", max_side=24)
    im = np.asarray(Image.open(png))
    assert im.shape == (24, 24, 4)
    valid = np.isfinite(crop.values[bands]).all(axis=0)[::2, ::2]
    np.testing.assert_array_equal(im[..., 3] == 255, valid)
    assert im[..., :3][valid].std() > 0
    ab = np.stack([np.full((48, 48), 0.2), np.full((48, 48), 0.8)]).astype(np.float32)
    ab[:, :5] = np.nan
    za = zarr.create_array(str(tmp_path / "a.zarr"), shape=ab.shape, chunks=ab.shape, dtype="float32")
    za[...] = ab
    q = np.asarray(Image.open(quicklook_abundances(tmp_path / "a.zarr", tmp_path / "ab.png", gap=4)))
    assert q.shape == (48, 100, 2)
    assert q[10, 10, 0] == 51 and q[10, 60, 0] == 204 and q[0, 0, 1] == 0


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/scene", "..", "a/../../b", "\x00x", ".hidden"])
def test_output_paths_cannot_escape_the_root(tmp_path: Path, name: str) -> None:
    p = confined_path(tmp_path, safe_name(name))
    assert tmp_path.resolve() in p.parents
    with pytest.raises(WriteError, match=r"escapes the output root"):
        confined_path(tmp_path, "..", "x")
    with pytest.raises(WriteError, match=r"escapes the output root"):
        confined_path(tmp_path, "/etc")
