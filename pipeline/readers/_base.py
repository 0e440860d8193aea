"""What every reader shares: the :class:`SceneSource` contract and the raw → canonical conversion.

A reader does not build the whole cube. It opens the file, parses its metadata and returns a
:class:`SceneSource`: the canonical metadata (wavelengths in nm, fwhm, bad bands, CRS, transform,
nodata value, scale factor) plus ``read(y0, y1, x0, x1)``, which reads one window of all bands and
returns canonical float32 values (scale divided out, nodata → NaN). ``open_scene`` wraps a source
in a dask array (lazy); ``ingest_scene`` calls ``read`` window by window (streaming).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from pipeline.errors import ConfigError, InputValidationError, ReadError
from pipeline.scene import build_scene

#: options every reader accepts (besides its own)
COMMON_OPTIONS = ("scale_factor", "nodata")
#: default chunk edge (pixels) of the lazy arrays ``open_scene`` returns
DEFAULT_CHUNK = 256
#: integer reflectance products (EnMAP, AVIRIS, ROSIS...) store reflectance × 10⁴
INTEGER_REFLECTANCE_SCALE = 10_000.0
#: at most this many overlapping detector segments are merged by sorting wavelengths
MAX_DETECTOR_SEGMENTS = 4
#: physically plausible reflectance after scaling (policy of issue 21, ``docs/inputs.md``). Surface
#: reflectance products hold small negatives (dark water, over-corrected haze, noise) and values
#: above 1 (sun glint, snow, clouds, BRDF effects: up to about 1.5); nothing a surface reflects lies
#: below -0.5 or above 2. Values outside are fill values (the USGS library's -1.23e34), hot or dead
#: detector elements, saturation codes or byte errors: they become nodata (NaN), counted per band
#: (``attrs["out_of_range_per_band"]`` of an ingested store). One such value would otherwise move
#: every statistic computed over the scene (scaling, noise estimates, subspaces, the unmixer's
#: sample) and with them every other pixel of the output.
REFLECTANCE_RANGE: tuple[float, float] = (-0.5, 2.0)


class SceneSource:
    """One opened input: canonical metadata plus a window reader.

    Subclasses set the attributes in ``__init__`` and implement :meth:`read_raw`. They must stay
    picklable (store paths, not open handles) because dask ships them to workers.
    """

    reader: str = ""
    path: Path
    shape: tuple[int, int, int]  # (band, y, x)
    raw_dtype: np.dtype
    wavelength: np.ndarray | None = None  # nm
    fwhm: np.ndarray | None = None  # nm
    good_band: np.ndarray | None = None
    crs: Any | None = None
    transform: Any | None = None
    nodata: float | None = None
    scale_factor: float = 1.0
    add_offset: float = 0.0
    scale_factor_source: str = "none"
    attrs: dict[str, Any]

    #: True when :meth:`read_raw` returns a new array the caller may modify in place
    fresh_reads: bool = False

    def read_raw(
        self, y0: int, y1: int, x0: int, x1: int, bands: np.ndarray | None = None
    ) -> np.ndarray:
        """Raw values (file dtype) of rows ``y0:y1``, cols ``x0:x1`` as (band, y, x).

        ``bands``: source band indexes (0-based) in the order wanted; None = all, file order.
        """
        raise NotImplementedError

    def read(
        self, y0: int, y1: int, x0: int, x1: int, out_of_range: np.ndarray | None = None
    ) -> np.ndarray:
        """Canonical float32 values of one window (scale divided out, nodata → NaN, band order).

        Values outside :data:`REFLECTANCE_RANGE` become NaN; ``out_of_range`` (int64, one entry
        per band in canonical order), when given, is incremented by their count per band.
        """
        order = self.band_order()
        raw = self.read_raw(y0, y1, x0, x1, bands=order)
        # convert in place when the raw buffer is ours (saves one window-sized copy)
        fresh = self.fresh_reads or order is not None
        return self.canonical(
            raw, where=(y0, y1, x0, x1), copy=not fresh, out_of_range=out_of_range
        )

    def band_order(self) -> np.ndarray | None:
        """Source band indexes in canonical (increasing wavelength) order; None when unchanged.

        Sensors with several spectrometers (EnMAP: VNIR 418–993 nm, SWIR 902–2445 nm) list each
        detector's bands in turn, so their wavelengths overlap. Up to
        :data:`MAX_DETECTOR_SEGMENTS` increasing runs are merged by sorting; anything else
        (reversed, shuffled, duplicated wavelengths) is left to the scene validation to reject.
        """
        if hasattr(self, "_band_order"):
            return self._band_order  # type: ignore[has-type]
        order = None
        wl = self.wavelength
        if wl is not None and wl.size > 1 and np.isfinite(wl).all():
            steps = np.diff(wl)
            runs = 1 + int((steps < 0).sum())
            if (steps < 0).any() and (steps != 0).all() and runs <= MAX_DETECTOR_SEGMENTS:
                starts = np.r_[0, np.flatnonzero(steps < 0) + 1, wl.size]
                if np.diff(starts).min() >= 2 and np.unique(wl).size == wl.size:
                    order = np.argsort(wl, kind="stable")
        self._band_order = order
        return order

    def canonical(
        self,
        raw: np.ndarray,
        where: Any = None,
        copy: bool = True,
        out_of_range: np.ndarray | None = None,
    ) -> np.ndarray:
        """Convert raw values to canonical float32: nodata → NaN, divide by the scale factor,
        values outside :data:`REFLECTANCE_RANGE` → NaN (counted per band into ``out_of_range``)."""
        return to_canonical(
            raw,
            copy=copy,
            out_of_range=out_of_range,
            nodata=self.nodata,
            scale_factor=self.scale_factor,
            add_offset=self.add_offset,
            source=self.path,
            where=where,
        )

    # -- helpers used by the readers -------------------------------------------------------
    def sample_raw(self, size: int = 64) -> np.ndarray:
        """A small central window of raw values (all bands) to sniff scale and byte order."""
        _, ny, nx = self.shape
        h, w = min(ny, size), min(nx, size)
        y0, x0 = (ny - h) // 2, (nx - w) // 2
        return self.read_raw(y0, y0 + h, x0, x0 + w)

    def valid_raw(self, raw: np.ndarray) -> np.ndarray:
        """Finite raw values that are not the nodata value (flattened)."""
        vals = raw.ravel()
        keep = np.ones(vals.shape, dtype=bool)
        if np.issubdtype(vals.dtype, np.floating):
            keep &= np.isfinite(vals)
        if self.nodata is not None and math.isfinite(self.nodata):
            keep &= vals != self.nodata
        return vals[keep]

    def resolve_scale(self, explicit: float | None, from_metadata: float | None, what: str) -> None:
        """Pick the scale factor: explicit option > file metadata > dtype/value convention."""
        if explicit is not None:
            self.scale_factor, self.scale_factor_source = _check_scale(explicit, "option"), "option"
            return
        if from_metadata is not None:
            self.scale_factor = _check_scale(from_metadata, what)
            self.scale_factor_source = what
            return
        if self.raw_dtype.kind in "iu" and self.raw_dtype.itemsize == 1:
            raise InputValidationError(
                f"{str(self.path)!r} holds 8-bit integers ({str(self.raw_dtype)!r}): no reflectance "
                "product stores 8-bit values, so no scale can be assumed (an RGB or preview image?). "
                "If these really are reflectance values, pass scale_factor=<number> "
                "(reflectance = raw / scale_factor)."
            )
        if self.raw_dtype.kind in "iu":
            self.scale_factor = INTEGER_REFLECTANCE_SCALE
            self.scale_factor_source = "assumed (integer reflectance x 10^4)"
            return
        vals = self.valid_raw(self.sample_raw())
        if vals.size and float(np.percentile(np.abs(vals), 99)) > 2.0:
            # float reflectance far above 1: the EnMAP ×10⁴ convention stored as float
            self.scale_factor = INTEGER_REFLECTANCE_SCALE
            self.scale_factor_source = "inferred (values look like reflectance x 10^4)"
        else:
            self.scale_factor, self.scale_factor_source = 1.0, "none"

    def to_dataarray(self, chunk: int = DEFAULT_CHUNK) -> xr.DataArray:
        """The canonical scene, lazily backed by dask windows of ``chunk`` × ``chunk`` pixels."""
        import dask.array as da

        nb, ny, nx = self.shape
        arr = da.from_array(
            _WindowAdapter(self),
            chunks=(nb, min(chunk, max(ny, 1)), min(chunk, max(nx, 1))),
            meta=np.empty((0, 0, 0), dtype=np.float32),
            asarray=False,
            lock=False,
            name=f"read-{self.reader}-{abs(hash((str(self.path), self.shape)))}",
        )
        return self.build(arr)

    def build(self, data: Any) -> xr.DataArray:
        """Wrap ``data`` (numpy or dask, canonical values) with this source's metadata."""
        attrs = dict(self.attrs)
        attrs["scale_factor_source"] = self.scale_factor_source
        order = self.band_order()
        wl, fw, gb = self.wavelength, self.fwhm, self.good_band
        if order is not None:
            wl, fw, gb = (None if v is None else np.asarray(v)[order] for v in (wl, fw, gb))
            attrs["source_band_order"] = order.tolist()
        if self.add_offset:
            attrs["add_offset"] = float(self.add_offset)
        if self.nodata is not None:
            attrs["source_nodata"] = float(self.nodata)
        return build_scene(
            data,
            wavelength=wl,
            fwhm=fw,
            good_band=gb,
            transform=self.transform,
            crs=self.crs,
            source=str(self.path),
            reader=self.reader,
            scale_factor=self.scale_factor,
            attrs=attrs,
        )


class _WindowAdapter:
    """Array-like view of a :class:`SceneSource` for ``dask.array.from_array``."""

    def __init__(self, src: SceneSource) -> None:
        self.src = src
        self.shape = src.shape
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        bsl, ysl, xsl = key
        nb, ny, nx = self.shape
        y0, y1, _ = ysl.indices(ny)
        x0, x1, _ = xsl.indices(nx)
        block = self.src.read(y0, y1, x0, x1)
        return block[bsl]


def _check_scale(value: Any, what: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = float("nan")
    if not math.isfinite(f) or f <= 0:
        raise InputValidationError(
            f"scale factor from {what} must be a positive finite number, got {value!r}; "
            "fix the metadata or pass scale_factor=<number> (the value the data were multiplied by)."
        )
    return f


def to_canonical(
    raw: np.ndarray,
    *,
    nodata: float | None,
    scale_factor: float,
    add_offset: float = 0.0,
    source: Any = "",
    where: Any = None,
    copy: bool = True,
    valid_range: tuple[float, float] | None = REFLECTANCE_RANGE,
    out_of_range: np.ndarray | None = None,
) -> np.ndarray:
    """Raw → canonical float32; raises on overflow (finite raw values that become infinite).

    Finite values outside ``valid_range`` after scaling become NaN (nodata); ``out_of_range``
    (int64, one entry per band of a ``(band, y, x)`` window) is incremented by their count per
    band. ``copy=False`` lets a float32 ``raw`` be converted in place (the caller owns the buffer).
    """
    if raw.dtype.kind not in "iuf":
        raise InputValidationError(
            f"non-numeric data type {str(raw.dtype)!r} in {str(source)!r}; hyperdeq reads real "
            "integer or floating-point cubes only. Convert the data (e.g. take the magnitude of "
            "complex values) before reading."
        )
    missing = None
    if nodata is not None:
        if math.isnan(nodata):
            missing = np.isnan(raw) if raw.dtype.kind == "f" else None
        else:
            missing = raw == raw.dtype.type(nodata) if _representable(nodata, raw.dtype) else None
    # infinities already in the file are not overflow (ingest rejects them separately)
    was_inf = np.isinf(raw) if raw.dtype.kind == "f" else None
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        out = raw.astype(np.float32, copy=copy)
        in_place = out is raw or np.shares_memory(out, raw)
        if scale_factor != 1.0:
            out /= np.float32(scale_factor)
        if add_offset:
            out += np.float32(add_offset)
    overflow = np.isinf(out)
    if was_inf is not None:
        overflow &= ~was_inf
    if missing is not None:
        overflow &= ~missing
    if overflow.any():
        idx = tuple(int(i) for i in np.argwhere(overflow)[0])
        value = "out of float32 range" if in_place else raw[idx].item()
        raise InputValidationError(
            f"overflow while scaling {str(source)!r}: raw value {value!r} at "
            f"(band, y, x) = {idx!r} of window {where!r} becomes infinite in float32 with scale "
            f"factor {scale_factor!r}; check the scale factor (reflectance = raw / scale_factor) "
            "or pass scale_factor=<number>."
        )
    if missing is not None:
        out[missing] = np.nan
    if valid_range is not None:
        lo, hi = np.float32(valid_range[0]), np.float32(valid_range[1])
        flat = out.reshape(out.shape[0] if out.ndim == 3 else 1, -1)
        with np.errstate(invalid="ignore"):  # fmin/fmax skip NaN: a cheap test of whole bands
            suspect = np.flatnonzero(
                (np.fmin.reduce(flat, axis=1) < lo) | (np.fmax.reduce(flat, axis=1) > hi)
            )
        # band by band: no window-sized temporaries; NaN and ±inf are kept
        # (infinities are rejected by the ingest with their position)
        for b in suspect if flat.shape[1] else ():
            band = out[b] if out.ndim == 3 else out
            with np.errstate(invalid="ignore"):
                bad = ((band < lo) | (band > hi)) & np.isfinite(band)
            n = int(np.count_nonzero(bad))
            if n:
                band[bad] = np.nan
                if out_of_range is not None and out.ndim == 3:
                    out_of_range[b] += n
    return out


def _representable(value: float, dtype: np.dtype) -> bool:
    if dtype.kind == "f":
        return True
    info = np.iinfo(dtype)
    return float(value).is_integer() and info.min <= value <= info.max


def check_path(path: str | Path) -> Path:
    """The input must exist; report missing files with the closest existing folder."""
    p = Path(path).expanduser()
    if not p.exists():
        parent = p.parent
        hint = (
            f"the folder {str(parent)!r} exists; check the file name"
            if parent.is_dir()
            else f"the folder {str(parent)!r} does not exist either"
        )
        raise ReadError(f"input file not found: {str(p)!r}; {hint}.")
    if not p.is_dir() and not p.is_file():
        import stat

        mode = p.stat().st_mode
        kind = (
            "a named pipe (FIFO)"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file"
        )
        raise ReadError(
            f"{str(p)!r} is {kind}, not a scene file: hyperdeq reads (and hashes) regular files "
            "only. Copy the data to a file first."
        )
    return p


def check_options(reader: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Reject options a reader does not understand (typos would otherwise be silently ignored)."""
    ok = set(allowed) | set(COMMON_OPTIONS)
    unknown = sorted(set(options) - ok)
    if unknown:
        raise ConfigError(
            f"reader {reader!r} does not accept option(s) {unknown!r}; accepted: {sorted(ok)!r}."
        )


def nm_factor(values: np.ndarray | None, units: str | None, *, source: Any = "") -> float:
    """Multiplier that turns wavelengths in ``units`` into nm (µm inferred when undeclared < 20)."""
    u = (units or "").strip().lower().replace("µ", "u").replace("μ", "u")
    if u in ("micrometers", "micrometer", "microns", "micron", "um", "micrometres", "micrometre"):
        return 1000.0
    if u in ("nanometers", "nanometer", "nm", "nanometres", "nanometre"):
        return 1.0
    if u in ("millimeters", "millimetres", "mm"):
        return 1e6
    if u in ("centimeters", "centimetres", "cm"):
        return 1e7
    if u in ("meters", "metres", "m"):
        return 1e9
    if u in ("angstroms", "angstrom"):
        return 0.1
    if u in ("wavenumber", "cm-1", "1/cm"):
        raise InputValidationError(
            f"wavelength units {units!r} in {str(source)!r} are wavenumbers; convert to nm first."
        )
    if u in ("ghz", "mhz", "thz", "hz"):
        raise InputValidationError(
            f"wavelength units {units!r} in {str(source)!r} are a frequency; convert to nm first."
        )
    if values is None:
        return 1.0
    v = np.asarray(values, dtype=np.float64).ravel()
    known = v[np.isfinite(v)]
    if known.size and float(known.max()) < 20.0:
        return 1000.0  # undeclared units; values below 20 can only be µm for VNIR–SWIR
    return 1.0


def wavelengths_to_nm(
    values: np.ndarray | None,
    units: str | None,
    *,
    source: Any = "",
    fwhm: np.ndarray | None = None,
) -> np.ndarray | None:
    """Wavelengths in nm; see :func:`nm_factor`. With ``fwhm``, returns that in the same unit."""
    if values is None and fwhm is None:
        return None
    f = nm_factor(values, units, source=source)
    target = values if fwhm is None else fwhm
    if target is None:
        return None
    return np.asarray(target, dtype=np.float64).ravel() * f


def parse_number_list(text: str) -> list[float]:
    """``'{ 0.46, 0.465 }'`` or ``'0.46,0.465'`` → floats."""
    body = text.strip().strip("{}").strip()
    if not body:
        return []
    return [float(t) for t in body.replace("\n", " ").split(",") if t.strip()]


def looks_byteswapped(sample: np.ndarray) -> bool:
    """True when the values make far more sense with the other byte order.

    Floats: swapped reflectance turns into denormals, NaNs or 1e30-scale numbers. Integers:
    swapped spectra lose their band-to-band smoothness (adjacent bands differ wildly).
    """
    if sample.size == 0 or sample.dtype.itemsize == 1:
        return False
    swapped = sample.byteswap()  # same dtype, bytes reversed: the other byte order's values
    if sample.dtype.kind == "f":
        return _plausible_fraction(swapped) > 0.95 and _plausible_fraction(sample) < 0.5
    if sample.ndim != 3 or sample.shape[0] < 3:
        return False
    a, b = _roughness(sample), _roughness(swapped)
    return b * 5.0 < a


def _plausible_fraction(v: np.ndarray) -> float:
    with np.errstate(all="ignore"):
        x = np.abs(v.astype(np.float64).ravel())
        ok = (x == 0) | ((x > 1e-12) & (x < 1e12))
    return float(ok.mean())


def _roughness(cube: np.ndarray) -> float:
    x = cube.astype(np.float64)
    d = np.abs(np.diff(x, axis=0))
    return float(np.median(d) / (np.median(np.abs(x)) + 1.0))
