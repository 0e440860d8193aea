"""A rotated or sheared GeoTIFF is refused: the scene's x/y coordinates cannot describe it.

The zarr store's pixel-centre coordinates come from the transform's pixel size and origin only,
so a rotation term would be dropped there while the COG output kept it: the two outputs would
disagree about where every pixel is. ENVI already refuses rotated 'map info'; GeoTIFF does too.
The files are a real EnMAP crop (tests/data) with its geotransform rewritten.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from pipeline.errors import ReadError
from pipeline.readers import open_scene
from tests.pipeline.test_tiles import write_crop_tif


def _with_transform(tmp_path: Path, name: str, transform: Affine) -> Path:
    p = write_crop_tif(tmp_path / f"{name}.tif", 96, 64, 8, 12)
    with rasterio.open(p, "r+") as f:
        f.transform = transform
    return p


@pytest.mark.parametrize(
    ("name", "transform"),
    [
        ("rotated", Affine(30.0, 5.0, 370000.0, 5.0, -30.0, 5800000.0)),
        ("sheared", Affine(30.0, 2.0, 370000.0, 0.0, -30.0, 5800000.0)),
        ("rot90", Affine(0.0, 30.0, 370000.0, 30.0, 0.0, 5800000.0)),
    ],
)
def test_rotated_or_sheared_geotiff_is_refused(
    tmp_path: Path, name: str, transform: Affine
) -> None:
    p = _with_transform(tmp_path, name, transform)
    with pytest.raises(
        ReadError,
        match=r"GeoTIFF '.*\.tif' has a rotated or sheared geotransform \(rotation/shear terms "
        r".*\); hyperdeq needs a north-up grid.*gdalwarp",
    ):
        open_scene(p)


def test_north_up_geotiff_still_reads(tmp_path: Path) -> None:
    t = Affine(30.0, 0.0, 370000.0, 0.0, -30.0, 5800000.0)
    scene = open_scene(_with_transform(tmp_path, "north_up", t))
    assert tuple(scene.rio.transform()) == tuple(t)
    np.testing.assert_allclose(scene["x"].values[:2], [370015.0, 370045.0])


def test_rounding_noise_in_the_rotation_terms_is_not_a_rotation(tmp_path: Path) -> None:
    """GDAL writes e.g. 1e-12 for a zero term after a reprojection: far below a pixel, accepted."""
    t = Affine(30.0, 1e-12, 370000.0, -1e-12, -30.0, 5800000.0)
    scene = open_scene(_with_transform(tmp_path, "noise", t))
    assert scene.shape == (224, 8, 12)
