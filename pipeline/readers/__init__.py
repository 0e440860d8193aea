"""Readers: every supported input format → the canonical scene (:mod:`pipeline.scene`).

``open_scene(path, format=None, **options)`` picks the reader from the file's content (magic
bytes), then its extension; ``format=`` overrides the choice. Options common to all readers:
``scale_factor`` (what raw values were multiplied by) and ``nodata`` (raw nodata value). Reader
specific options: ``.mat`` → ``variable``, ``rows``, ``cols``, ``wavelength_variable``;
NetCDF/HDF5/zarr → ``variable``, ``dims``.

GeoTIFF, ENVI, NetCDF and zarr scenes come back lazy (dask, ``chunk``-sized windows); ``.mat``
cubes are small and come back in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import xarray as xr

from pipeline.errors import ConfigError, InputValidationError, ReadError, UnknownFormatError
from pipeline.readers._base import DEFAULT_CHUNK, SceneSource, check_path
from pipeline.readers.hyperdeq_zarr import ZarrSceneSource, is_hyperdeq_zarr, is_zarr_dir

__all__ = [
    "FORMATS",
    "open_scene",
    "open_source",
    "detect_format",
    "check_input",
    "SceneSource",
    "is_hyperdeq_zarr",
]


def _geotiff(path: Path, **o: Any) -> SceneSource:
    from pipeline.readers.geotiff import open_geotiff

    return open_geotiff(path, **o)


def _envi(path: Path, **o: Any) -> SceneSource:
    from pipeline.readers.envi import open_envi

    return open_envi(path, **o)


def _netcdf(path: Path, **o: Any) -> SceneSource:
    from pipeline.readers.xrcube import open_netcdf

    return open_netcdf(path, **o)


def _mat(path: Path, **o: Any) -> SceneSource:
    from pipeline.readers.matlab import open_mat

    return open_mat(path, **o)


def _zarr(path: Path, **o: Any) -> SceneSource:
    if is_hyperdeq_zarr(path):
        return ZarrSceneSource(path, **o)
    from pipeline.readers.xrcube import BareZarrSource, open_foreign_zarr

    try:
        return open_foreign_zarr(path, **o)
    except InputValidationError:
        raise  # xarray opened it: its own answer (e.g. which dim is the band axis) stands
    except ReadError:
        # no xarray dimension names: a plain zarr array written by another tool
        return BareZarrSource(path, **{k: v for k, v in o.items() if k != "dims"})
    # (``layout`` only matters for bare arrays; the xarray path ignores it)


#: format name → source factory; ``format=`` takes one of these names
FORMATS: dict[str, Callable[..., SceneSource]] = {
    "geotiff": _geotiff,
    "envi": _envi,
    "netcdf": _netcdf,
    "mat": _mat,
    "zarr": _zarr,
}
_ALIASES = {
    "tif": "geotiff",
    "tiff": "geotiff",
    "cog": "geotiff",
    "gtiff": "geotiff",
    "nc": "netcdf",
    "hdf5": "netcdf",
    "h5": "netcdf",
    "matlab": "mat",
}
_EXT = {
    ".tif": "geotiff",
    ".tiff": "geotiff",
    ".gtif": "geotiff",
    ".hdr": "envi",
    ".bsq": "envi",
    ".bil": "envi",
    ".bip": "envi",
    ".nc": "netcdf",
    ".nc4": "netcdf",
    ".cdf": "netcdf",
    ".h5": "netcdf",
    ".hdf5": "netcdf",
    ".he5": "netcdf",
    ".mat": "mat",
    ".zarr": "zarr",
}


def detect_format(path: str | Path) -> str:
    """The reader name for ``path``: content (magic bytes) first, then the extension."""
    p = check_path(path)
    if p.is_dir():
        if is_zarr_dir(p):
            return "zarr"
        try:
            what = "an empty folder" if not any(p.iterdir()) else "not a zarr store: no zarr.json"
        except OSError as exc:
            raise ReadError(
                f"cannot list the folder {str(p)!r}: {exc}; check permissions."
            ) from exc
        raise ReadError(
            f"{str(p)!r} is a directory, not a scene file ({what}); "
            "give the path of the scene file itself."
        )
    try:
        with open(p, "rb") as f:
            head = f.read(1024)
    except OSError as exc:
        raise ReadError(f"cannot read {str(p)!r}: {exc}; check permissions.") from exc
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "geotiff"
    if head[:6] == b"MATLAB":
        return "mat"
    if head[:4] in (b"CDF\x01", b"CDF\x02") or head[:8] == b"\x89HDF\r\n\x1a\n":
        return "netcdf"
    if head[:4] == b"ENVI":
        return "envi"
    ext = p.suffix.lower()
    if ext in _EXT:
        return _EXT[ext]
    if Path(str(p) + ".hdr").is_file() or p.with_suffix(".hdr").is_file():
        return "envi"
    raise UnknownFormatError(
        f"unknown scene format for {str(p)!r} (extension {ext!r}, first bytes {head[:8]!r}); "
        f"supported formats: {sorted(FORMATS)!r}. Pass format=<one of these> if the file is one."
    )


def check_input(path: str | Path, format: str | None = None) -> Path:
    """Cheap checks of an input path before anything hashes or reads it: it exists, is a regular
    file or a non-empty folder, and (without ``format``) its format is recognised. Returns the path.

    Call this first: hashing a FIFO or an empty folder can only say "cannot hash".
    """
    p = check_path(path)
    if format is None:
        detect_format(p)
    return p


def _canonical_format(fmt: str) -> str:
    f = fmt.strip().lower()
    f = _ALIASES.get(f, f)
    if f not in FORMATS:
        raise UnknownFormatError(f"unknown format {fmt!r}; supported formats: {sorted(FORMATS)!r}.")
    return f


def open_source(path: str | Path, format: str | None = None, **options: Any) -> SceneSource:
    """Open ``path`` as a :class:`SceneSource` (metadata + window reader), without reading it all."""
    p = check_path(path)
    nodata = options.get("nodata")
    if nodata is not None:
        try:
            options["nodata"] = float(nodata)
        except (TypeError, ValueError):
            raise ConfigError(
                f"nodata must be a number (the raw value that marks missing pixels), got {nodata!r}."
            ) from None
    fmt = _canonical_format(format) if format else detect_format(p)
    if p.is_dir() and fmt != "zarr":
        raise ReadError(
            f"{str(p)!r} is a directory but format {fmt!r} reads files; give the file path."
        )
    return FORMATS[fmt](p, **options)


def open_scene(path: str | Path, format: str | None = None, **options: Any) -> xr.DataArray:
    """Open any supported scene as the canonical DataArray (lazy where the format has windows).

    ``chunk`` (pixels, default 256) sets the dask chunk edge of lazy scenes.
    """
    chunk = int(options.pop("chunk", DEFAULT_CHUNK))
    if chunk < 1:
        raise ConfigError(f"chunk must be a positive number of pixels, got {chunk!r}.")
    return open_source(path, format, **options).to_dataarray(chunk)
