"""Writers: zarr template + region writes, COG, quicklooks; round trips against the real input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr
from PIL import Image

from pipeline import quicklooks as ql
from pipeline.errors import WriteError
from pipeline.quicklooks import quicklook_abundances, quicklook_rgb, quicklook_spectra, rgb_bands
from pipeline.writers import (
    confined_path,
    create_output_zarr,
    mark_complete,
    open_output,
    safe_name,
    write_cog,
)
from tests.pipeline.test_tiles import real_crop


@pytest.fixture(scope="module")
def crop() -> xr.DataArray:
    return real_crop()


def _bands(crop: xr.DataArray) -> dict[str, np.ndarray]:
    return {k: crop[k].values for k in ("band", "wavelength", "fwhm", "good_band")}


def test_zarr_output_round_trip_keeps_crs_transform_wavelengths_nodata(
    tmp_path: Path, crop: xr.DataArray
) -> None:
    arrays = create_output_zarr(
        tmp_path / "denoised.zarr",
        "denoised",
        crop,
        channel_dim="band",
        channel_coords=_bands(crop),
        chunk=16,
        attrs={"model": "test"},
    )
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
    assert (
        back.attrs.get("grid_mapping") == "spatial_ref"
        or back.encoding.get("grid_mapping") == "spatial_ref"
    )
    g = zarr.open_group(str(tmp_path / "denoised.zarr")).attrs
    assert g["proj:code"] == "EPSG:32633" and g["hyperdeq_complete"] and g["model"] == "test"
    assert g["proj:transform"] == list(crop.rio.transform())[:6]
    with pytest.raises(WriteError, match=r"already exists; remove it or use a new run directory"):
        create_output_zarr(
            tmp_path / "denoised.zarr", "denoised", crop, channel_dim="band", chunk=16
        )


def test_abundance_zarr_with_endmember_names_and_2d_rmse(
    tmp_path: Path, crop: xr.DataArray
) -> None:
    arrays = create_output_zarr(
        tmp_path / "ab.zarr",
        "abundances",
        crop,
        channel_dim="endmember",
        channel_coords={"endmember": np.array(["soil", "tree", "water"], dtype=object)},
        chunk=16,
        extra=[("rmse", None, None)],
    )
    assert zarr.open_array(arrays["rmse"]).shape == (48, 48)
    ab = open_output(tmp_path / "ab.zarr", "abundances")
    assert list(ab["endmember"].values) == ["soil", "tree", "water"]
    assert ab.rio.crs == crop.rio.crs
    rm = open_output(tmp_path / "ab.zarr", "rmse")
    assert rm.dims == ("y", "x") and rm.rio.transform() == crop.rio.transform()


def test_cog_round_trip(tmp_path: Path, crop: xr.DataArray) -> None:
    arrays = create_output_zarr(
        tmp_path / "d.zarr",
        "denoised",
        crop,
        channel_dim="band",
        channel_coords=_bands(crop),
        chunk=16,
    )
    zarr.open_array(arrays["denoised"], mode="r+")[...] = crop.values
    wl = crop["wavelength"].values
    tif = write_cog(
        arrays["denoised"],
        tmp_path / "denoised.tif",
        crop,
        descriptions=[f"{w:.3f} nm" for w in wl],
        band_tags=[{"wavelength": w} for w in wl],
        block=16,
    )
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
    """The run folder's PNGs from the zarr outputs: >= 256 px, titled from what the store holds
    (long name, band wavelengths, endmember names), nodata transparent, the artifacts' renderer."""
    arrays = create_output_zarr(
        tmp_path / "d.zarr",
        "denoised",
        crop,
        channel_dim="band",
        channel_coords=_bands(crop),
        chunk=16,
    )
    zarr.open_array(arrays["denoised"], mode="r+")[...] = crop.values
    wl = crop["wavelength"].values
    bands = rgb_bands(wl, len(wl), crop["good_band"].values)
    assert [abs(wl[b] - t) < 10 for b, t in zip(bands, (640, 550, 460), strict=True)] == [True] * 3
    png = quicklook_rgb(arrays["denoised"], bands, tmp_path / "rgb.png")
    im = np.asarray(Image.open(png))
    # 48 px scene enlarged 6x (nearest) to 288 px, under a title strip
    assert (
        Image.open(png).mode == "RGBA" and im.shape[1] == 288 and im.shape[0] >= 288 + ql.HEADER_PX
    )
    head, body = im[:-288], im[-288:]
    assert (head[..., 3] == 255).all() and (head[..., :3] < 128).all(axis=-1).any()
    valid = np.isfinite(crop.values[list(bands)]).all(axis=0)
    assert not valid.all()  # the crop has nodata: transparency is checked, not assumed
    np.testing.assert_array_equal(body[..., 3] == 255, np.kron(valid, np.ones((6, 6), bool)))
    assert body[..., :3][body[..., 3] == 255].std() > 0
    # the same pixels as the artifacts' renderer with the bands named: one renderer
    title = ql.rgb_title("denoised surface reflectance", [wl[b] for b in bands])
    np.testing.assert_array_equal(
        im, np.asarray(Image.open(io.BytesIO(ql.rgb_png(crop.values, bands, 1024, title=title))))
    )
    # a large scene is capped at max_side
    small = np.asarray(
        Image.open(
            quicklook_rgb(arrays["denoised"], bands, tmp_path / "s.png", max_side=24, min_side=0)
        )
    )
    assert small.shape[1] == 24

    ab = np.stack([np.full((48, 48), 0.2), np.full((48, 48), 0.8)]).astype(np.float32)
    ab[:, :, :5] = np.nan
    za = create_output_zarr(
        tmp_path / "a.zarr",
        "abundances",
        crop,
        channel_dim="endmember",
        chunk=16,
        channel_coords={"endmember": np.array(["soil", "tree"], dtype=object)},
    )
    zarr.open_array(za["abundances"], mode="r+")[...] = ab
    q = np.asarray(Image.open(quicklook_abundances(za["abundances"], tmp_path / "ab.png")))
    assert q.shape == (288 + ql.HEADER_PX, 2 * (288 + 8) + 92, 4)
    for k, value in enumerate((0.2, 0.8)):
        x0 = k * (288 + 8)
        assert (q[: ql.HEADER_PX, x0 : x0 + 288, :3] < 128).all(axis=-1).any()  # titled
        assert (q[ql.HEADER_PX :, x0 : x0 + 30, 3] == 0).all()  # nodata columns transparent
        px = q[ql.HEADER_PX + 10, x0 + 100]
        np.testing.assert_array_equal(px[:3], (ql._colorize(np.array([value])) * 255).round()[0])
        assert px[3] == 255
    # the titles are the stored endmember names
    named = np.asarray(
        Image.open(
            quicklook_abundances(za["abundances"], tmp_path / "ab2.png", names=["soil", "tree"])
        )
    )
    renamed = np.asarray(
        Image.open(quicklook_abundances(za["abundances"], tmp_path / "ab3.png", names=["x", "y"]))
    )
    np.testing.assert_array_equal(q, named)
    assert (renamed[: ql.HEADER_PX] != q[: ql.HEADER_PX]).any()

    (tmp_path / "em.json").write_text(
        json.dumps(
            {
                "wavelength_nm": [float(w) for w in wl[:40]],
                "endmembers": {"soil": [0.2] * 40, "tree": [0.4] * 40},
            }
        )
    )
    sp = np.asarray(
        Image.open(quicklook_spectra(tmp_path / "em.json", tmp_path / "sp.png")).convert("RGB")
    )
    assert sp.shape == (400, 720, 3)
    for colour in ql.LINE_COLOURS[:2]:
        assert (np.abs(sp.astype(int) - colour).sum(axis=-1) < 30).sum() > 200


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/abs/scene", "..", "a/../../b", "\x00x", ".hidden"]
)
def test_output_paths_cannot_escape_the_root(tmp_path: Path, name: str) -> None:
    p = confined_path(tmp_path, safe_name(name))
    assert tmp_path.resolve() in p.parents
    with pytest.raises(WriteError, match=r"escapes the output root"):
        confined_path(tmp_path, "..", "x")
    with pytest.raises(WriteError, match=r"escapes the output root"):
        confined_path(tmp_path, "/etc")
