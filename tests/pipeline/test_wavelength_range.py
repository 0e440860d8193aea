"""Wavelengths outside any imaging spectrometer's range are a unit mix-up, refused with the fix.

Real Gamsberg (ENVI) and EnMAP (GeoTIFF) crops whose metadata declare the wrong unit.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipeline.errors import InputValidationError
from pipeline.readers import open_scene
from pipeline.scene import MissingCRSWarning, build_scene
from tests.pipeline.test_readers import TILE, gamsberg_header, gamsberg_raw, write_envi

WL_NM = [
    float(v) for v in gamsberg_header()["wavelength"].strip("{}").replace("\n", " ").split(",")
]
FIX = r"wavelength units are probably wrong.*Fix 'wavelength units' or the wavelength values"


def _envi(tmp_path: Path, units: str, wl: list[float]) -> Path:
    extra = {"wavelength units": units, "wavelength": "{" + ", ".join(f"{w:g}" for w in wl) + "}"}
    return write_envi(tmp_path / "scene.bsq", gamsberg_raw(), extra=extra)


@pytest.mark.parametrize(
    ("units", "scale", "match"),
    [
        (
            "Nanometers",
            1e-3,
            r"wavelength 0\.42682 nm of band 0 \(range 0\.42682-2\.32491 nm\) is outside 100-20000 nm",
        ),
        ("Micrometers", 1.0, r"wavelength 426820\.0\d* nm of band 0 .* is outside 100-20000 nm"),
    ],
)
def test_envi_wavelengths_in_the_wrong_unit(
    tmp_path: Path, units: str, scale: float, match: str
) -> None:
    p = _envi(tmp_path, units, [w * scale for w in WL_NM])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingCRSWarning)
        with pytest.raises(InputValidationError, match=match + ".*" + FIX):
            open_scene(p)


def test_geotiff_micrometre_tags_declared_nanometres(tmp_path: Path) -> None:
    dest = tmp_path / "um_as_nm.tif"
    with rasterio.open(TILE) as src:
        with rasterio.open(dest, "w", **src.profile) as out:
            out.write(src.read())
            for b in range(1, src.count + 1):
                t = src.tags(b)
                out.update_tags(
                    b,
                    **{
                        **t,
                        "wavelength": str(float(t["wavelength"]) / 1000),
                        "wavelength_units": "Nanometers",
                    },
                )
    with pytest.raises(InputValidationError, match=r"wavelength 0\.4\d* nm of band 0 .*" + FIX):
        open_scene(dest)


def test_negative_wavelengths_refused_and_real_ranges_kept() -> None:
    cube = np.ones((3, 2, 2), np.float32)
    with pytest.raises(InputValidationError, match=r"wavelength -5\.0 nm of band 0"):
        build_scene(cube, wavelength=[-5.0, 500.0, 600.0], crs="EPSG:32633")
    for wl in ([368.0, 700.0, 1043.0], [7500.0, 9000.0, 12000.0]):  # CASI VNIR, thermal IR
        assert (
            build_scene(cube, wavelength=wl, crs="EPSG:32633")["wavelength"].values.tolist() == wl
        )
