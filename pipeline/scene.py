"""The canonical scene: one ``xarray.DataArray`` that every reader produces and every stage consumes.

Conventions (defined here once; never rely on axis position elsewhere):

* dims are ``DIMS = ("band", "y", "x")``;
* values are float32 physical values with scale factors applied (reflectance in [0, 1]);
* coordinates on ``band``: ``wavelength`` (nm, float64, NaN where unknown), ``fwhm`` (nm, NaN where
  unknown) and ``good_band`` (bool; ENVI ``bbl``: False marks a bad band);
* ``y``/``x`` are map coordinates of pixel centres when the scene is georeferenced, pixel indices
  otherwise; CRS and affine transform are attached with rioxarray (``spatial_ref`` coordinate);
* **nodata is NaN** in the float cube. A pixel is *valid* when every good band is finite
  (:func:`valid_mask`). Bad bands may hold NaN everywhere; they never make a pixel invalid.
  Zeros are data, never nodata.
* ``attrs``: ``source`` (path), ``reader`` (name), ``source_scale_factor`` (what was divided out of the
  raw values; deliberately not ``scale_factor``, which xarray's CF decoding would apply again),
  ``crs_missing`` (True when the input carried no CRS).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from pipeline.errors import InputValidationError

DIMS: tuple[str, str, str] = ("band", "y", "x")
NODATA_CONVENTION = "NaN in float outputs; a pixel is valid when all good bands are finite"
#: wavelengths (nm) an imaging spectrometer can have, UV to thermal infrared; values outside come
#: from a unit mix-up (µm declared as nm or the reverse) or from band numbers given as wavelengths
WAVELENGTH_RANGE_NM: tuple[float, float] = (100.0, 20_000.0)

#: the smallest scene (rows, cols) hyperdeq can tile and denoise: DECSC estimates each band's noise
#: from 2 x 2 pixel differences and denoises spatial neighbourhoods (``denoise_cube`` refuses less)
MIN_SCENE_SIZE: tuple[int, int] = (2, 2)


def check_tileable(shape: Sequence[int], source: Any = "") -> None:
    """Refuse scenes (``(band, y, x)`` or ``(y, x)`` shape) below :data:`MIN_SCENE_SIZE` with a clear message."""
    ny, nx = (int(v) for v in tuple(shape)[-2:])
    my, mx = MIN_SCENE_SIZE
    if ny < my or nx < mx:
        what = "1 pixel" if ny == nx == 1 else f"{ny!r} row(s) x {nx!r} column(s)"
        raise InputValidationError(
            f"scene {str(source)!r} is too small to tile: {what} (shape (band, y, x) = "
            f"{tuple(int(v) for v in shape)!r}); hyperdeq needs at least {my} x {mx} pixels (the "
            "denoiser estimates noise from 2 x 2 pixel neighbourhoods). Give a larger crop of the "
            "scene; single spectra or transects cannot be processed."
        )


class MissingCRSWarning(UserWarning):
    """The scene carries no CRS: it is processed, but outputs cannot be georeferenced."""


def build_scene(
    data: Any,
    *,
    wavelength: Sequence[float] | np.ndarray | None = None,
    fwhm: Sequence[float] | np.ndarray | None = None,
    good_band: Sequence[bool] | np.ndarray | None = None,
    transform: Any | None = None,
    crs: Any | None = None,
    source: str = "",
    reader: str = "",
    scale_factor: float = 1.0,
    name: str = "reflectance",
    attrs: dict[str, Any] | None = None,
) -> xr.DataArray:
    """Wrap a ``(band, y, x)`` array (numpy or dask) in the canonical form and validate it.

    ``transform`` is an ``affine.Affine`` (pixel corner based, as rasterio); when given, ``y`` and
    ``x`` become pixel-centre map coordinates. ``crs`` is anything rasterio understands.
    """
    if data.ndim != 3:
        raise InputValidationError(
            f"a scene must be 3-D (band, y, x); got an array of shape {tuple(data.shape)!r}. "
            "Reshape the cube to (bands, rows, cols) before building a scene."
        )
    nb, ny, nx = (int(s) for s in data.shape)
    if data.dtype != np.float32:
        data = data.astype(np.float32)

    def _band_coord(values: Any, what: str, fill: Any, dtype: Any) -> np.ndarray:
        if values is None:
            return np.full(nb, fill, dtype=dtype)
        arr = np.asarray(values, dtype=dtype).ravel()
        if arr.size != nb:
            raise InputValidationError(
                f"{what} has {arr.size} values but the cube has {nb} bands; "
                f"fix the metadata so that there is one {what} value per band."
            )
        return arr

    wl = _band_coord(wavelength, "wavelength", np.nan, np.float64)
    fw = _band_coord(fwhm, "fwhm", np.nan, np.float64)
    gb = _band_coord(good_band, "good_band", True, bool)

    if transform is not None:
        # pixel-centre coordinates from a corner-based affine transform
        xs = transform.c + transform.a * (np.arange(nx) + 0.5)
        ys = transform.f + transform.e * (np.arange(ny) + 0.5)
    else:
        xs = np.arange(nx, dtype=np.float64)
        ys = np.arange(ny, dtype=np.float64)

    da = xr.DataArray(
        data,
        dims=DIMS,
        coords={
            "band": np.arange(nb),
            "wavelength": ("band", wl),
            "fwhm": ("band", fw),
            "good_band": ("band", gb),
            "y": ys,
            "x": xs,
        },
        name=name,
        attrs=dict(attrs or {}),
    )
    da.attrs.update(
        source=str(source),
        reader=reader,
        source_scale_factor=float(scale_factor),
        nodata_convention=NODATA_CONVENTION,
    )
    if crs is not None:
        da = da.rio.write_crs(crs)
        da.attrs["crs_missing"] = False
    else:
        da.attrs["crs_missing"] = True
    if transform is not None:
        da = da.rio.write_transform(transform)
    validate_scene(da)
    return da


def validate_scene(da: xr.DataArray, *, check_values: bool = False) -> xr.DataArray:
    """Check the canonical-form invariants; raise :class:`InputValidationError` with a fix.

    ``check_values`` additionally loads the data to reject all-nodata scenes and infinities
    (cheap for small scenes; readers of big scenes do this chunk-wise during ingest instead).
    """
    if tuple(da.dims) != DIMS:
        raise InputValidationError(
            f"scene dims must be {DIMS!r}, got {tuple(da.dims)!r}; "
            "transpose with da.transpose('band', 'y', 'x')."
        )
    nb, ny, nx = da.shape
    if ny == 0 or nx == 0 or nb == 0:
        raise InputValidationError(
            f"zero-size raster: shape (band, y, x) = {tuple(da.shape)!r}; "
            "the input holds no pixels, check the file or the crop window."
        )
    if nb < 2:
        raise InputValidationError(
            f"a hyperspectral scene needs at least 2 bands, got {nb!r}; "
            "this looks like a single-band image, not an HSI cube."
        )
    if not np.issubdtype(da.dtype, np.floating):
        raise InputValidationError(
            f"scene values must be floating point, got dtype {str(da.dtype)!r}."
        )
    wl = np.asarray(da["wavelength"].values, dtype=np.float64)
    known = wl[np.isfinite(wl)]
    if known.size and known.size != wl.size:
        raise InputValidationError(
            f"wavelengths are known for {known.size} of {wl.size} bands; give all or none."
        )
    lo, hi = WAVELENGTH_RANGE_NM
    outside = np.flatnonzero((wl < lo) | (wl > hi))
    if outside.size:
        i = int(outside[0])
        raise InputValidationError(
            f"wavelength {float(wl[i])!r} nm of band {i} (range {float(known.min())!r}-"
            f"{float(known.max())!r} nm) is outside {lo:g}-{hi:g} nm, where imaging spectrometers "
            "measure: the wavelength units are probably wrong (values in micrometres declared as "
            "nanometres or the reverse, or band numbers given as wavelengths). Fix 'wavelength "
            "units' or the wavelength values in the metadata."
        )
    if known.size > 1 and not np.all(np.diff(known) > 0):
        bad = int(np.argmax(np.diff(known) <= 0))
        raise InputValidationError(
            f"wavelengths must be strictly increasing; band {bad + 1} ({known[bad + 1]!r} nm) "
            f"does not follow band {bad} ({known[bad]!r} nm). Fix the header or reorder bands."
        )
    if not bool(np.asarray(da["good_band"].values).any()):
        raise InputValidationError(
            "every band is flagged bad (bbl all 0); nothing can be processed. Check the bbl metadata."
        )
    if da.attrs.get("crs_missing", False):
        warnings.warn(
            f"scene {da.attrs.get('source', '')!r} has no CRS: it will be processed, but outputs "
            "cannot be georeferenced. Attach a CRS (e.g. rioxarray's write_crs) if you know it.",
            MissingCRSWarning,
            stacklevel=2,
        )
    if check_values:
        check_scene_values(da)
    return da


def check_scene_values(da: xr.DataArray) -> None:
    """Reject infinities and all-nodata scenes (loads the good bands)."""
    good = np.asarray(da["good_band"].values, dtype=bool)
    vals = np.asarray(da.isel(band=np.flatnonzero(good)).values)
    if np.isinf(vals).any():
        n = int(np.isinf(vals).sum())
        raise InputValidationError(
            f"the scene holds {n!r} infinite values; infinities are not valid reflectance. "
            "Mask them as nodata (NaN) or fix the scale factor."
        )
    if not np.isfinite(vals).all(axis=0).any():
        raise InputValidationError(
            f"all-nodata scene: no pixel of {da.attrs.get('source', '')!r} has finite values in "
            "every good band; check the nodata value or the crop."
        )


def good_band_index(da: xr.DataArray) -> np.ndarray:
    """Integer positions of the good bands."""
    return np.flatnonzero(np.asarray(da["good_band"].values, dtype=bool))


def valid_mask(da: xr.DataArray) -> xr.DataArray:
    """Per-pixel validity (``y``, ``x``): True where every good band is finite. Lazy for dask."""
    good = da.isel(band=good_band_index(da))
    finite: xr.DataArray = np.isfinite(good)  # type: ignore[assignment]
    return finite.all("band").rename("valid")


def nodata_fraction(da: xr.DataArray) -> float:
    """Fraction of pixels that are nodata (computes)."""
    return float(1.0 - valid_mask(da).mean().values)
