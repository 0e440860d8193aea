import numpy as np
import pytest
from affine import Affine

from pipeline.errors import InputValidationError
from pipeline.scene import DIMS, MissingCRSWarning, build_scene, nodata_fraction, valid_mask


def _cube(nb=5, ny=4, nx=3):
    return np.arange(nb * ny * nx, dtype=np.float32).reshape(nb, ny, nx)


def test_build_scene_georeferenced():
    t = Affine(30.0, 0, 1000.0, 0, -30.0, 5000.0)
    da = build_scene(_cube(), wavelength=[400, 500, 600, 700, 800], transform=t, crs="EPSG:32633")
    assert da.dims == DIMS
    assert da.dtype == np.float32
    assert da.rio.crs.to_epsg() == 32633
    assert da.x.values[0] == pytest.approx(1015.0)  # pixel centre
    assert da.y.values[0] == pytest.approx(4985.0)
    assert da.rio.transform() == t


def test_valid_mask_ignores_bad_bands():
    cube = _cube()
    cube[0] = np.nan  # a bad band full of NaN
    cube[2, 1, 1] = np.nan  # a nodata pixel in a good band
    with pytest.warns(MissingCRSWarning):
        da = build_scene(cube, good_band=[False, True, True, True, True])
    m = valid_mask(da).values
    assert m.sum() == 4 * 3 - 1 and not m[1, 1]
    assert nodata_fraction(da) == pytest.approx(1 / 12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(wavelength=[1, 2, 3]), "wavelength has 3 values but the cube has 5 bands"),
        (dict(wavelength=[400, 500, 450, 700, 800]), "strictly increasing"),
        (dict(good_band=[False] * 5), "every band is flagged bad"),
    ],
)
def test_build_scene_rejects_bad_metadata(kwargs, match):
    with pytest.raises(InputValidationError, match=match):
        build_scene(_cube(), crs="EPSG:4326", **kwargs)


def test_build_scene_rejects_bad_shapes():
    with pytest.raises(InputValidationError, match="at least 2 bands"):
        build_scene(_cube(nb=1), crs="EPSG:4326")
    with pytest.raises(InputValidationError, match="zero-size raster"):
        build_scene(np.zeros((3, 0, 4), np.float32), crs="EPSG:4326")
