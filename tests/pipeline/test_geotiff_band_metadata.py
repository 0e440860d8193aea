"""GeoTIFF band metadata that is wrong (not the pixels): named as such, never called 'corrupt or truncated'.

Every file is the real EnMAP Potsdam tile (tests/data) with its tags or GDAL scales edited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from pipeline.errors import ConfigError, InputValidationError
from pipeline.readers import open_scene
from tests.pipeline.test_readers import BERLIN, TILE


def _copy(
    dest: Path, *, tags: Any = None, scales: list[float] | None = None, dtype: str | None = None
) -> Path:
    """The tile with per-band tags ``tags(band_no, tags) -> tags`` and optional scales/dtype."""
    with rasterio.open(TILE) as src:
        data = src.read()
        prof = src.profile
        if dtype:
            data = np.where(data == src.nodata, -32768, data).astype(dtype)
            prof = prof | {"dtype": dtype, "nodata": -32768}
        with rasterio.open(dest, "w", **prof) as out:
            out.write(data)
            out.update_tags(**src.tags())
            for b in range(1, src.count + 1):
                t = src.tags(b)
                out.update_tags(b, **(tags(b, t) if tags else t))
            if scales is not None:
                out.scales = scales
    return dest


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("wavelength", "abc", r"band 3 has 'wavelength' tag 'abc', not a number; fix the tag"),
        ("fwhm", "n/a", r"band 3 has 'fwhm' tag 'n/a', not a number"),
        ("bbl", "true", r"band 3 has 'bbl' tag 'true', not a number"),
    ],
)
def test_non_numeric_band_tag(tmp_path: Path, key: str, value: str, match: str) -> None:
    p = _copy(tmp_path / "tags.tif", tags=lambda b, t: {**t, key: value} if b == 3 else t)
    with pytest.raises(InputValidationError, match=match) as info:
        open_scene(p)
    assert "corrupt or truncated" not in str(info.value)


def test_wavelength_tag_on_some_bands_only(tmp_path: Path) -> None:
    p = _copy(
        tmp_path / "partial.tif",
        tags=lambda b, t: t if b % 2 else {k: v for k, v in t.items() if k != "wavelength"},
    )
    with pytest.raises(
        InputValidationError,
        match=r"112 of 224 bands have a 'wavelength' tag \(band\(s\) \[2, 4, 6, 8, 10\]",
    ):
        open_scene(p)


def test_bands_with_different_gdal_scales(tmp_path: Path) -> None:
    """One band scaled 10x differently: applying one scale to all would make that band wrong."""
    p = _copy(tmp_path / "scales.tif", dtype="int16", scales=[1e-4] * 223 + [1e-3])
    with pytest.raises(
        InputValidationError,
        match=r"different GDAL scales \[0\.0001, 0\.001\]; hyperdeq applies one",
    ):
        open_scene(p)
    # an explicit scale factor is the user's statement that one value fits every band
    da = open_scene(p, scale_factor=10000)
    assert da.attrs["scale_factor_source"] == "option"


def test_nodata_option_must_be_a_number() -> None:
    with pytest.raises(ConfigError, match=r"nodata must be a number .* got 'abc'"):
        open_scene(BERLIN, nodata="abc")
    assert open_scene(BERLIN, nodata="-9999").attrs["source_nodata"] == -9999.0
