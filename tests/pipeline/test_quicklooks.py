"""Quicklook rendering (pipeline.quicklooks): one renderer for the run folder's PNGs and the artifacts'."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import quicklooks as q


@pytest.fixture(scope="module")
def enmap_tile(test_data: Path):
    from pipeline.readers import open_scene

    return open_scene(test_data / "enmap_potsdam_tile" / "enmap_potsdam_tile_128_0.tif").load()


def _img(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def _ink(a: np.ndarray) -> bool:
    """Dark pixels (text) in an RGB(A) region."""
    return bool((a[..., :3] < 128).all(axis=-1).any())


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of True in a 1-D mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def test_rgb_bands_pick_true_colour_good_bands(enmap_tile) -> None:
    wl = enmap_tile["wavelength"].values
    good = enmap_tile["good_band"].values
    r, g, b = q.rgb_bands(wl, len(wl), good)
    assert abs(wl[r] - 640) < 10 and abs(wl[g] - 550) < 10 and abs(wl[b] - 460) < 10
    assert good[[r, g, b]].all()
    # a bad band is never shown, even when it is the nearest: the next good one is
    bad = good.copy()
    bad[r] = False
    r2, _, _ = q.rgb_bands(wl, len(wl), bad)
    assert r2 != r and bad[r2] and abs(wl[r2] - 640) < 20
    # an unknown wavelength (NaN) on one band does not throw the others away
    wl2 = wl.astype(float).copy()
    wl2[0] = np.nan
    assert q.rgb_bands(wl2, len(wl2), good) == (r, g, b)
    # without wavelengths: spread over the good bands, red from the long end
    assert q.rgb_bands(None, 10) == (7, 5, 2)
    assert q.rgb_bands([np.nan] * 10, 10, [True] * 5 + [False] * 5) == (3, 2, 1)


def test_rgb_title_names_the_bands() -> None:
    t = q.rgb_title("x", [641.1, 550.5, 458.9]).replace("\u00a0", " ")
    assert t == "x · R 641 nm G 550 nm B 459 nm"
    assert q.rgb_title("x", None) == q.rgb_title("x", [np.nan, 1.0, 2.0]) == "x"


def test_rgb_png_marks_nodata_transparent_and_is_at_least_256_px(enmap_tile) -> None:
    cube = enmap_tile.values.copy()
    cube[:, :4, :] = np.nan  # a nodata strip
    bands = q.rgb_bands(
        enmap_tile["wavelength"].values, cube.shape[0], enmap_tile["good_band"].values
    )
    a = _img(q.rgb_png(cube, bands))
    # the 32 px tile is enlarged 8x (nearest): every scene pixel is an 8x8 block
    assert a.shape == (256, 256, 4)
    assert (a[:32, :, 3] == 0).all() and (a[32:, :, 3] == 255).all()
    assert a[32:, :, :3].std() > 10  # real image content, stretched
    np.testing.assert_array_equal(a[32:40, 0:8], np.broadcast_to(a[32, 0], (8, 8, 4)))
    titled = _img(q.rgb_png(cube, bands, title="input (before denoising)"))
    assert titled.shape == (256 + q.HEADER_PX, 256, 4)
    header = titled[: q.HEADER_PX]
    assert _ink(header) and (header[..., 3] == 255).all()  # text on opaque white
    np.testing.assert_array_equal(titled[q.HEADER_PX :], a)
    # a title too long for one line wraps: the strip grows, the image stays below it
    wl = enmap_tile["wavelength"].values
    long = _img(
        q.rgb_png(
            cube, bands, title=q.rgb_title("denoised surface reflectance", [wl[b] for b in bands])
        )
    )
    assert long.shape[0] > titled.shape[0] and _ink(long[q.HEADER_PX : long.shape[0] - 256])
    np.testing.assert_array_equal(long[-256:], a)


def test_rgb_png_is_downsampled_to_max_side() -> None:
    big = np.random.default_rng(0).random((3, 1000, 800)).astype(np.float32)
    img = Image.open(io.BytesIO(q.rgb_png(big, (0, 1, 2), max_side=200)))
    assert max(img.size) <= 200 and img.size == (160, 200)


def test_abundance_png_has_labelled_panels_a_colour_bar_and_transparent_nodata() -> None:
    ab = np.stack([np.linspace(0, 1, 400).reshape(20, 20)] * 3)
    ab[:, :2] = np.nan
    png = q.abundance_png(ab, ["vegetation", "soil", "water"], gap=2)
    rgba = _img(png)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    panel = 20 * 13  # 20 px enlarged by 13 to reach 256 px
    assert rgba.shape[-1] == 4 and img.shape[0] == panel + q.HEADER_PX
    assert img.shape[1] > 3 * panel + 2 * 2  # the colour bar is to the right
    maps = img[q.HEADER_PX :]
    # three map panels and the colour bar: the column runs that are mostly coloured (not white)
    coloured = ((maps != 255).any(axis=-1)).mean(axis=0) > 0.5
    runs = _runs(coloured)
    assert len(runs) == 4, runs
    assert [b - a for a, b in runs[:3]] == [panel] * 3 and runs[3][1] - runs[3][0] < 30
    for k in range(3):
        x0 = k * (panel + 2)
        assert runs[k][0] == x0
        assert _ink(rgba[: q.HEADER_PX, x0 : x0 + panel])  # each panel titled
        # nodata rows: transparent (white once flattened); data rows opaque
        assert (rgba[q.HEADER_PX : q.HEADER_PX + 26, x0 : x0 + panel, 3] == 0).all()
        assert (img[q.HEADER_PX : q.HEADER_PX + 26, x0 : x0 + panel] == 255).all()
        assert (rgba[q.HEADER_PX + 26 :, x0 : x0 + panel, 3] == 255).all()
    assert (rgba[: q.HEADER_PX, ..., 3] == 255).all()  # titles opaque
    bar = img[q.HEADER_PX + 10 : -10, 3 * (panel + 2) + 8]  # a column inside the colour bar
    assert len({tuple(c) for c in bar}) > 20  # a ramp, not a flat colour
    # the same value maps to the same colour in every panel (one fixed 0-1 scale)
    assert (img[200, 100] == img[200, 100 + panel + 2]).all()
    # the titles are the names: other names, other titles, the same maps
    other = _img(q.abundance_png(ab, ["a", "b", "c"], gap=2))
    assert other.shape == rgba.shape
    assert (other[: q.HEADER_PX] != rgba[: q.HEADER_PX]).any()
    np.testing.assert_array_equal(
        other[q.HEADER_PX :, : 3 * panel], rgba[q.HEADER_PX :, : 3 * panel]
    )


def test_spectra_png_draws_each_endmember_against_wavelength(enmap_tile) -> None:
    wl = enmap_tile["wavelength"].values
    keep = np.flatnonzero(enmap_tile["good_band"].values)
    cube = enmap_tile.values[keep]
    spectra = {"bright": np.nanmax(cube, axis=(1, 2)), "dark": np.nanmin(cube, axis=(1, 2))}
    png = q.spectra_png([float(w) for w in wl[keep]], {k: v.tolist() for k, v in spectra.items()})
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert img.shape == (400, 720, 3)
    for colour in q.LINE_COLOURS[:2]:  # both lines and their legend entries are drawn
        assert (np.abs(img.astype(int) - colour).sum(axis=-1) < 30).sum() > 200
    assert not (
        np.abs(img.astype(int) - q.LINE_COLOURS[2]).sum(axis=-1) < 30
    ).any()  # no third line


def test_data_uri_round_trips() -> None:
    png = q.rgb_png(np.ones((3, 4, 4), np.float32), (0, 1, 2))
    uri = q.data_uri(png)
    assert (
        uri.startswith("data:image/png;base64,") and base64.b64decode(uri.split(",", 1)[1]) == png
    )
