"""GeoTIFF / COG reader (rasterio): band tags or PAM ``.aux.xml`` metadata, windowed reads.

Wavelengths come from per-band ``wavelength`` tags (EnMAP-Box style), from a dataset-level
``wavelength = { ... }`` list (GDAL's ENVI-style metadata, often in ``.aux.xml``) or from the
``ENVI`` metadata domain; ``wavelength_units`` says nm or µm. ``bbl`` (per band or list) marks bad
bands. Integer data and GDAL scale tags are turned into physical reflectance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputValidationError, ReadError
from pipeline.readers._base import SceneSource, check_options, parse_number_list, wavelengths_to_nm

OPTIONS: tuple[str, ...] = ()
#: GDAL's block cache defaults to 5 % of RAM and would make RSS grow with the scene; windows are
#: read once each, so a small cache loses nothing
GDAL_CACHE_MB = 64
#: a file declaring more than this many raw bytes ...
SPARSE_MIN_DECLARED = 1 << 30
#: ... that is this many times smaller than what it declares is refused: real hyperspectral data
#: compress 2-5x (the demo mosaic, 40 % nodata: 4.9x); a ratio of 1000 means missing (sparse)
#: blocks or a forged header, and ingest would write a store the size of the declared cube
SPARSE_MAX_RATIO = 1000.0


def _env() -> Any:
    import rasterio

    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)


def _rasterio_error(path: Path, exc: Exception, doing: str) -> ReadError:
    detail = str(exc).rstrip(".")
    if exc.__cause__ is not None:
        detail += f" ({str(exc.__cause__).rstrip('.')})"
    return ReadError(
        f"cannot {doing} GeoTIFF {str(path)!r}: {detail}. The file is corrupt or truncated "
        "(an interrupted copy or download?); copy it again or check it with `gdalinfo -checksum`."
    )


class GeoTiffSource(SceneSource):
    """A GeoTIFF/COG opened with rasterio; every read opens the file (picklable, fork-safe)."""

    reader = "geotiff"

    def __init__(self, path: Path, **options: Any) -> None:
        import rasterio

        check_options(self.reader, options, OPTIONS)
        self.path = path
        self.attrs = {}
        try:
            with _env(), rasterio.open(path) as ds:
                self.shape = (ds.count, ds.height, ds.width)
                self.raw_dtype = np.dtype(ds.dtypes[0])
                if len(set(ds.dtypes)) > 1:
                    raise ReadError(
                        f"bands of {str(path)!r} have different data types {sorted(set(ds.dtypes))!r}; "
                        "hyperdeq needs one dtype per cube. Rewrite the file with one dtype."
                    )
                self.crs = ds.crs if ds.crs else None
                self.transform = None if ds.transform.is_identity else ds.transform
                self._check_crs()
                self._check_declared_size(ds)
                if self.transform is not None:
                    self._check_north_up(self.transform)
                self.nodata = options.get("nodata", ds.nodata)
                self._read_metadata(ds)
                scales, offsets = set(ds.scales), set(ds.offsets)
        except ReadError:
            raise
        except Exception as exc:  # rasterio raises RasterioIOError and friends
            raise _rasterio_error(path, exc, "open") from exc
        meta_scale = None
        for what, vals in (("scale", scales), ("offset", offsets)):
            if len(vals) > 1 and not (what == "scale" and options.get("scale_factor") is not None):
                raise InputValidationError(
                    f"bands of {str(path)!r} have different GDAL {what}s {sorted(vals)!r}; hyperdeq "
                    f"applies one {what} to the whole cube, so some bands would come out wrong. "
                    "Rewrite the file with one scale and offset for all bands (or, for scales, pass "
                    "scale_factor=<number> if one value is right for every band)."
                )
        if len(scales) == 1 and scales != {1.0}:
            s = scales.pop()
            meta_scale = round(1.0 / s, 9) if s else s  # GDAL scale multiplies; we divide
        if len(offsets) == 1 and offsets != {0.0}:
            self.add_offset = float(offsets.pop())
        if self.raw_dtype.kind not in "iuf":
            raise InputValidationError(
                f"non-numeric data type {str(self.raw_dtype)!r} in {str(path)!r}; hyperdeq reads "
                "real integer or floating-point cubes only. Convert the data first."
            )
        self._check_readable()
        self.resolve_scale(options.get("scale_factor"), meta_scale, "GDAL scale tag")

    def _check_crs(self) -> None:
        """Refuse a CRS GDAL could not resolve: an unknown EPSG code in the GeoKeys comes back as a
        local (engineering) CRS, and the outputs would carry it as if it were the scene's CRS."""
        if self.crs is None:
            return
        wkt = self.crs.to_wkt()
        if wkt.startswith(("LOCAL_CS", "ENGCRS", "ENGINEERING")):
            raise InputValidationError(
                f"GeoTIFF {str(self.path)!r} declares a CRS that is neither geographic nor projected "
                f"(GDAL reads it as the local CRS {wkt[:120]!r}): usually an unknown or invalid EPSG "
                "code in its GeoKeys. Set the right CRS (e.g. `gdal_edit.py -a_srs EPSG:32633 "
                "file.tif`), or remove it (`gdal_edit.py -a_srs '' file.tif`) to process the scene "
                "without georeferencing."
            )

    def _check_declared_size(self, ds: Any) -> None:
        """Refuse files far smaller than the cube they declare (sparse or forged headers)."""
        nb, ny, nx = self.shape
        declared = nb * ny * nx * self.raw_dtype.itemsize
        try:
            size = max(self.path.stat().st_size, 1)
        except OSError:
            return
        if declared > SPARSE_MIN_DECLARED and declared / size > SPARSE_MAX_RATIO:
            raise InputValidationError(
                f"GeoTIFF {str(self.path)!r} declares {nb!r} bands x {ny!r} rows x {nx!r} columns "
                f"of {str(self.raw_dtype)!r} ({declared / 2**30:.1f} GiB) but the file holds only "
                f"{size!r} bytes ({declared / size:.0f}x less; real data compress 2-5x): a sparse "
                "file whose blocks are missing, or a damaged header. Check it with `gdalinfo "
                "-checksum`; hyperdeq does not process it."
            )

    def _check_north_up(self, t: Any) -> None:
        """Refuse rotation/shear terms: the scene's x/y coordinates (and the zarr store) would drop
        them while the COG output kept them. Terms moving pixels by < 0.001 px over the whole
        scene are rounding noise (GDAL writes such values after reprojections) and pass."""
        _, ny, nx = self.shape
        if abs(t.b) * max(ny, 1) <= 1e-3 * abs(t.a) and abs(t.d) * max(nx, 1) <= 1e-3 * abs(t.e):
            return
        raise InputValidationError(
            f"GeoTIFF {str(self.path)!r} has a rotated or sheared geotransform (rotation/shear "
            f"terms {t.b!r}, {t.d!r}; transform {tuple(t)[:6]!r}); hyperdeq needs a north-up grid "
            "(its x/y coordinates cannot describe a rotation). Warp the scene to a north-up grid "
            "first, e.g. `gdalwarp -r near in.tif north_up.tif`."
        )

    def _read_metadata(self, ds: Any) -> None:
        nb = ds.count
        dstags = {k.lower(): v for k, v in ds.tags().items()}
        envi = (
            {k.lower(): v for k, v in ds.tags(ns="ENVI").items()}
            if "ENVI" in (ds.tag_namespaces() or [])
            else {}
        )
        btags = [{k.lower(): v for k, v in ds.tags(i + 1).items()} for i in range(nb)]

        def per_band(key: str) -> list[str] | None:
            vals = [t.get(key) for t in btags]
            if all(v is not None for v in vals):
                return vals  # type: ignore[return-value]
            for src in (dstags, envi):
                if key in src:
                    try:
                        return [str(v) for v in parse_number_list(src[key])]
                    except ValueError:
                        raise InputValidationError(
                            f"GeoTIFF {str(self.path)!r}: the dataset tag {key!r} = {src[key][:80]!r} "
                            "is not a list of numbers; fix the tag (e.g. with gdal_edit.py -mo)."
                        ) from None
            tagged = [i + 1 for i, v in enumerate(vals) if v is not None]
            if tagged:
                missing = [i + 1 for i, v in enumerate(vals) if v is None]
                raise InputValidationError(
                    f"GeoTIFF {str(self.path)!r}: {len(tagged)} of {nb} bands have a {key!r} tag "
                    f"(band(s) {missing[:5]!r}{'...' if len(missing) > 5 else ''} have none); tag every "
                    "band or none (e.g. with gdal_edit.py -mo)."
                )
            return None

        def numbers(key: str, vals: list[str]) -> np.ndarray:
            try:
                return np.asarray([float(v) for v in vals], dtype=np.float64)
            except ValueError:
                bad = next(i for i, v in enumerate(vals) if not _is_number(v))
                raise InputValidationError(
                    f"GeoTIFF {str(self.path)!r}: band {bad + 1} has {key!r} tag {vals[bad]!r}, "
                    "not a number; fix the tag (e.g. with gdal_edit.py -mo)."
                ) from None

        units = (
            btags[0].get("wavelength_units")
            or dstags.get("wavelength_units")
            or envi.get("wavelength_units")
            or envi.get("wavelength units")
        )
        wl = per_band("wavelength")
        fw = per_band("fwhm")
        bbl = per_band("bbl")
        wl_raw = numbers("wavelength", wl) if wl else None
        self.wavelength = wavelengths_to_nm(wl_raw, units, source=self.path)
        self.fwhm = (
            wavelengths_to_nm(wl_raw, units, source=self.path, fwhm=numbers("fwhm", fw))
            if fw
            else None
        )
        self.good_band = numbers("bbl", bbl) != 0 if bbl else None
        if "start_time" in dstags:
            self.attrs["start_time"] = dstags["start_time"]

    def _check_readable(self) -> None:
        """Read the first and last pixel (their blocks): truncated files lose their tail, this catches it early."""
        import rasterio
        from rasterio.windows import Window

        nb, ny, nx = self.shape
        try:
            with _env(), rasterio.open(self.path) as ds:
                # one pixel of each corner block: GDAL still decodes the block, but copies nothing
                ds.read(window=Window(0, 0, 1, 1))
                ds.read(window=Window(max(nx - 1, 0), max(ny - 1, 0), 1, 1))
        except Exception as exc:
            raise _rasterio_error(self.path, exc, "read") from exc

    fresh_reads = True

    def read_raw(
        self, y0: int, y1: int, x0: int, x1: int, bands: np.ndarray | None = None
    ) -> np.ndarray:
        import rasterio
        from rasterio.windows import Window

        indexes = None if bands is None else [int(b) + 1 for b in bands]
        try:
            with _env(), rasterio.open(self.path) as ds:
                return ds.read(indexes=indexes, window=Window(x0, y0, x1 - x0, y1 - y0))
        except Exception as exc:
            raise _rasterio_error(
                self.path, exc, f"read window rows {y0}:{y1} cols {x0}:{x1} of"
            ) from exc


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def open_geotiff(path: Path, **options: Any) -> GeoTiffSource:
    """Open a GeoTIFF/COG as a :class:`SceneSource`."""
    return GeoTiffSource(path, **options)


def crop_geotiff(src: Path, dest: Path, window: tuple[int, int, int, int]) -> Path:
    """Write the pixel window ``(row0, row1, col0, col1)`` of GeoTIFF ``src`` to ``dest``.

    Georeferencing (CRS, shifted transform), nodata, dataset and per-band tags (wavelength,
    fwhm, bbl), band descriptions, scales and offsets are kept, so the crop reads exactly like
    the source. The file is written beside ``dest`` and renamed into place: a crash never leaves
    a partial crop under ``dest``. An existing ``dest`` is left as it is and returned.
    """
    import os

    import rasterio
    from rasterio.windows import Window

    src, dest = Path(src), Path(dest)
    if dest.is_file():
        return dest
    r0, r1, c0, c1 = (int(v) for v in window)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _env(), rasterio.open(src) as ds:
            if not (0 <= r0 < r1 <= ds.height and 0 <= c0 < c1 <= ds.width):
                raise ReadError(
                    f"crop window rows {r0}:{r1}, cols {c0}:{c1} is outside {str(src)!r} "
                    f"({ds.height} × {ds.width} px); pick a window inside the scene"
                )
            win = Window(c0, r0, c1 - c0, r1 - r0)
            profile = ds.profile.copy()
            blk = 16 if min(r1 - r0, c1 - c0) >= 16 else None
            profile.update(height=r1 - r0, width=c1 - c0, transform=ds.window_transform(win))
            if blk is None:
                profile.update(tiled=False)
                profile.pop("blockxsize", None)
                profile.pop("blockysize", None)
            else:
                profile.update(blockxsize=blk, blockysize=blk)
            with rasterio.open(tmp, "w", **profile) as out:
                out.write(ds.read(window=win))
                out.update_tags(**ds.tags())
                for b in range(1, ds.count + 1):
                    out.update_tags(b, **ds.tags(b))
                    if ds.descriptions[b - 1]:
                        out.set_band_description(b, ds.descriptions[b - 1])
                out.scales, out.offsets = ds.scales, ds.offsets
        os.replace(tmp, dest)
    except rasterio.errors.RasterioError as exc:
        raise _rasterio_error(src, exc, "crop") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest
