"""ENVI headers whose values are nonsense: each is a ReadError naming the key and the value, never a traceback.

The cube is the real Gamsberg subset (tests/data); only the header is changed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import InputValidationError, ReadError
from pipeline.readers import open_scene
from pipeline.scene import MissingCRSWarning
from tests.pipeline.test_readers import gamsberg_header, gamsberg_raw, write_envi

UTM = "{UTM, 1, 1, 500000, 7000000, 30, 30, %s, South, WGS-84%s}"


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        (
            {"header offset": -400},
            ReadError,
            r"'header offset' must be zero or positive, got -400; fix the header",
        ),
        ({"samples": -10, "lines": -25}, ReadError, r"'samples' must be zero or positive, got -10"),
        (
            {"data ignore value": "none"},
            ReadError,
            r"'data ignore value' must be a number, got 'none'",
        ),
        (
            {"reflectance scale factor": "abc"},
            ReadError,
            r"'reflectance scale factor' must be a number, got 'abc'",
        ),
        (
            {"bbl": "{" + ", ".join(["yes"] * 189) + "}"},
            InputValidationError,
            r"non-numeric 'bbl' entry .*'yes'.*1 \(good band\) or 0 \(bad band\)",
        ),
        (
            {"map info": UTM % ("xx", "")},
            ReadError,
            r"'map info' UTM zone 'xx' is not a zone number 1-60",
        ),
        (
            {"map info": UTM % ("99", "")},
            ReadError,
            r"'map info' UTM zone '99' is not a zone number 1-60",
        ),
        (
            {"map info": UTM % ("33", ", rotation=abc")},
            ReadError,
            r"'map info' rotation 'rotation=abc' is not a number",
        ),
        (
            {"map info": "{UTM, 1, 1, 500000, 7000000, 0, 0, 33, South, WGS-84}"},
            ReadError,
            r"'map info' pixel size \(0\.0, 0\.0\) must be non-zero and finite",
        ),
        (
            {"wavelength units": "GHz"},
            InputValidationError,
            r"wavelength units 'GHz' .* are a frequency",
        ),
    ],
)
def test_nonsense_header_value_is_a_clear_error(
    tmp_path: Path, extra: dict, error: type, match: str
) -> None:
    p = write_envi(tmp_path / "scene.bsq", gamsberg_raw(), extra=extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingCRSWarning)
        with pytest.raises(error, match=match):
            open_scene(p)


def test_wavelength_units_index_means_no_wavelengths(tmp_path: Path) -> None:
    """ENVI's 'Index' unit: the values are band numbers, not wavelengths in any unit."""
    extra = {
        "wavelength units": "Index",
        "wavelength": "{" + ", ".join(str(i) for i in range(189)) + "}",
    }
    p = write_envi(tmp_path / "scene.bsq", gamsberg_raw(), extra=extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingCRSWarning)
        da = open_scene(p)
    assert np.isnan(da["wavelength"].values).all() and np.isnan(da["fwhm"].values).all()
    assert da.shape == (189, 25, 10)


def test_valid_header_numbers_still_read(tmp_path: Path) -> None:
    """The same keys with sensible values keep working (nodata, scale, UTM map info)."""
    extra = {
        "data ignore value": "-1",
        "reflectance scale factor": "10000",
        "map info": UTM % ("33", ""),
    }
    # the stored values are reflectance x 10^4 (max 5837): the declared factor brings them to [0, 1]
    p = write_envi(tmp_path / "scene.bsq", gamsberg_raw(), extra=extra)
    da = open_scene(p)
    assert da.rio.crs.to_epsg() == 32733 and da.attrs["source_nodata"] == -1.0
    assert float(da.max()) == pytest.approx(float(gamsberg_raw().max()) / 10000, rel=1e-5)
    assert len(gamsberg_header()["wavelength"]) > 0
