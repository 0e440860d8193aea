"""Georeferenced outputs: zarr v3 (template then region writes), COG (quicklook PNGs: ``pipeline.quicklooks``).

* Each zarr output is created once from a lazy template (``to_zarr(compute=False)``), so that
  coordinates, CRS (CF ``spatial_ref`` + ``grid_mapping``) and GeoZarr-style ``proj:`` attributes
  exist before any data; blend tasks then fill it chunk by chunk, one task per chunk.
* COGs are written block by block from the zarr (bounded memory) into a tiled GeoTIFF with band
  interleave and internal overviews.
* Every output path is confined to the run's output root, whatever the scene name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as dsa
import numpy as np
import xarray as xr
import zarr

from pipeline.chunk_checksums import ChunkChecksumError, compressors, read_checked
from pipeline.errors import WriteError

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


# ---------------------------------------------------------------------------- paths
def safe_name(name: str) -> str:
    """A file-system-safe, non-hidden single path component made from ``name``."""
    s = _SAFE.sub("_", str(name)).strip("._-")
    return s[:120] or "scene"


def confined_path(root: str | Path, *parts: str) -> Path:
    """``root/parts...`` resolved, refusing anything that escapes ``root`` (``..``, absolute parts, links)."""
    base = Path(root).resolve()
    p = base.joinpath(*parts).resolve()
    if p != base and base not in p.parents:
        raise WriteError(
            f"output path {str(Path(root).joinpath(*parts))!r} escapes the output root {str(base)!r}; "
            "use a plain file name"
        )
    for folder in (base, *(q for q in p.parents if base in q.parents)):
        if folder.exists() and not folder.is_dir():
            raise WriteError(
                f"output folder {str(folder)!r} exists but is a file, not a directory; choose "
                "another output root (--out) or move the file away."
            )
    return p


# ---------------------------------------------------------------------------- metadata
#: units of every wavelength and FWHM hyperdeq writes (readers convert the source's units to nm)
WAVELENGTH_UNITS = "nm"
#: CF/ACDD conventions the zarr outputs follow
CONVENTIONS = "CF-1.10, ACDD-1.3"
#: scene attributes that may hold the acquisition (start) time, in order of preference
_TIME_KEYS = (
    "acquisition_time",
    "start_time",
    "datetime",
    "time_coverage_start",
    "acquisition_start_time",
)
#: per-variable CF attributes of the known outputs (values in [0, 1], NaN = nodata)
VARIABLE_ATTRS: dict[str, dict[str, Any]] = {
    "denoised": {
        "long_name": "denoised surface reflectance",
        "units": "1",
        "comment": "reflectance in [0, 1]; multiply by source_scale_factor for the source's scale",
    },
    "abundances": {
        "long_name": "endmember abundance (fraction of the pixel)",
        "units": "1",
        "valid_min": 0.0,
        "valid_max": 1.0,
    },
    "rmse": {
        "long_name": "unmixing reconstruction RMSE (Y vs E A, or s E A with the scaled mixing model) "
        "over good bands",
        "units": "1",
    },
}
BAND_COORD_ATTRS: dict[str, dict[str, Any]] = {
    "wavelength": {
        "long_name": "band centre wavelength",
        "standard_name": "radiation_wavelength",
        "units": WAVELENGTH_UNITS,
    },
    "fwhm": {"long_name": "band full width at half maximum", "units": WAVELENGTH_UNITS},
    "good_band": {
        "long_name": "good band flag (ENVI bbl)",
        "comment": "True: good band; False: bad band (kept in the output, not to be trusted)",
    },
    "band": {"long_name": "band number (0-based, in wavelength order)"},
}
_UNIT_NAMES = {
    "metre": "m",
    "meter": "m",
    "kilometre": "km",
    "US survey foot": "US_survey_foot",
    "foot": "ft",
    "degree": "degree",
}


def acquisition_time(like: xr.DataArray | dict[str, Any]) -> str | None:
    """The scene's acquisition (start) time as ISO 8601 UTC (``...Z``), from its attrs; None if unknown.

    Readers keep what the file says (EnMAP GeoTIFFs: ``start_time``); a time without a zone is UTC,
    as in the EnMAP and EMIT products.
    """
    import datetime as dt

    attrs = like.attrs if isinstance(like, xr.DataArray) else like
    for k in _TIME_KEYS:
        v = attrs.get(k)
        if v in (None, ""):
            continue
        try:
            t = dt.datetime.fromisoformat(str(v).strip().replace("Z", "+00:00").replace(" ", "T"))
        except ValueError:
            continue
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.UTC)
        return t.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return None


def scene_metadata(like: xr.DataArray) -> dict[str, Any]:
    """Scene-level metadata every output carries: acquisition time, reflectance scale, units, source."""
    a = like.attrs
    out: dict[str, Any] = {
        "wavelength_units": WAVELENGTH_UNITS,
        "reflectance_units": "1 (reflectance in [0, 1])",
    }
    t = acquisition_time(like)
    if t is not None:
        out["acquisition_time"] = t
    scale = a.get("source_scale_factor", a.get("scale_factor"))
    if scale is not None:
        out["source_scale_factor"] = float(scale)
        out["source_scale_note"] = (
            "values are reflectance in [0, 1]: the source's raw values divided "
            "by source_scale_factor"
        )
    for k in ("scale_factor_source", "source_wavelength_units", "source"):
        if a.get(k) not in (None, ""):
            out[k] = a[k]
    if "good_band" in like.coords:
        good = np.asarray(like["good_band"].values, dtype=bool)
        out["bad_bands"] = [int(i) for i in np.flatnonzero(~good)]
    return out


def _xy_attrs(like: xr.DataArray) -> dict[str, dict[str, Any]]:
    """CF attributes (units, standard names) of the ``x``/``y`` coordinates from the CRS."""
    crs = like.rio.crs
    if crs is None:
        return {
            "x": {"long_name": "column (pixel centre index)", "units": "1"},
            "y": {"long_name": "row (pixel centre index)", "units": "1"},
        }
    if crs.is_geographic:
        return {
            "x": {"standard_name": "longitude", "long_name": "longitude", "units": "degrees_east"},
            "y": {"standard_name": "latitude", "long_name": "latitude", "units": "degrees_north"},
        }
    import pyproj

    unit = pyproj.CRS.from_user_input(crs.to_wkt()).axis_info[0].unit_name
    u = _UNIT_NAMES.get(unit, unit)
    return {
        "x": {
            "standard_name": "projection_x_coordinate",
            "long_name": "x coordinate of projection",
            "units": u,
        },
        "y": {
            "standard_name": "projection_y_coordinate",
            "long_name": "y coordinate of projection",
            "units": u,
        },
    }


# ---------------------------------------------------------------------------- zarr
def geo_attrs(like: xr.DataArray) -> dict[str, Any]:
    """GeoZarr/STAC-projection style attributes (``proj:*``) of a georeferenced DataArray.

    ``proj:wkt2`` is WKT2 (ISO 19162:2019), as the projection extension requires; rasterio's
    default ``to_wkt()`` gives GDAL's WKT1.
    """
    crs = like.rio.crs
    if crs is None:
        return {"crs_missing": True}
    t = like.rio.transform()
    out: dict[str, Any] = {
        "proj:wkt2": crs.to_wkt(version="WKT2_2019"),
        "proj:transform": [t.a, t.b, t.c, t.d, t.e, t.f],
        "proj:shape": [int(like.sizes["y"]), int(like.sizes["x"])],
        "grid_mapping": "spatial_ref",
    }
    epsg = crs.to_epsg()
    if epsg is not None:
        out["proj:code"] = f"EPSG:{epsg}"
    return out


def _consolidate(path: str | Path) -> None:
    """Write zarr's consolidated metadata (xarray opens without probing every array or warning)."""
    import warnings

    with warnings.catch_warnings():
        # zarr-python: consolidated metadata is not (yet) in the zarr v3 specification
        warnings.filterwarnings(
            "ignore", message=".*[Cc]onsolidated metadata", category=UserWarning
        )
        zarr.consolidate_metadata(str(path))


def update_output_attrs(path: str | Path, attrs: dict[str, Any]) -> None:
    """Update a store's root attributes and rewrite its consolidated metadata to match.

    Use this (not ``zarr.open_group(...).attrs.update``) on a hyperdeq output: the consolidated
    copy that xarray reads first would otherwise keep the old attributes.
    """
    g = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    g.attrs.update(attrs)
    _consolidate(path)


def create_output_zarr(
    path: str | Path,
    name: str,
    like: xr.DataArray,
    *,
    channel_dim: str | None,
    channel_coords: dict[str, Any] | None = None,
    chunk: int,
    attrs: dict[str, Any] | None = None,
    extra: Sequence[tuple[str, str | None, dict[str, Any] | None]] = (),
    var_attrs: dict[str, dict[str, Any]] | None = None,
) -> dict[str, str]:
    """Create a zarr v3 store holding ``name`` (and ``extra`` variables) on ``like``'s grid, empty.

    ``channel_dim`` None gives a ``(y, x)`` variable. ``channel_coords``: coordinates along the
    channel dim (the first entry's length is the channel count). Chunks are ``(all channels,
    chunk, chunk)``. Returns ``{variable: array path}`` for region writes. Refuses to overwrite.

    Metadata (CF + GeoZarr): units and names on ``x``/``y`` (from the CRS), ``wavelength``/``fwhm``
    (nm) and ``good_band``; per-variable ``long_name``/``units`` (:data:`VARIABLE_ATTRS`, then
    ``var_attrs``); root attributes :func:`scene_metadata` (acquisition time, reflectance scale,
    bad bands), :func:`geo_attrs` (``proj:*`` with WKT2), then ``attrs``; consolidated metadata.
    """
    path = Path(path)
    if path.exists():
        raise WriteError(
            f"output {str(path)!r} already exists; remove it or use a new run directory"
        )
    ny, nx = int(like.sizes["y"]), int(like.sizes["x"])
    variables: dict[str, xr.DataArray] = {}
    encoding: dict[str, dict[str, Any]] = {}
    for vname, dim, coords in [(name, channel_dim, channel_coords), *extra]:
        coords = dict(coords or {})
        if dim is None:
            shape: tuple[int, ...] = (ny, nx)
            chunks: tuple[int, ...] = (chunk, chunk)
            dims: tuple[str, ...] = ("y", "x")
        else:
            n = len(next(iter(coords.values()))) if coords else 1
            shape, chunks, dims = (n, ny, nx), (n, chunk, chunk), (dim, "y", "x")
        data = dsa.full(shape, np.nan, dtype=np.float32, chunks=chunks)
        c: dict[str, Any] = {"y": like["y"].values, "x": like["x"].values}
        if dim is not None:
            for k, v in coords.items():
                c[k] = np.asarray(v) if k == dim else (dim, np.asarray(v))
            c.setdefault(dim, np.arange(shape[0]))
        va = {**VARIABLE_ATTRS.get(vname, {}), **(var_attrs or {}).get(vname, {})}
        variables[vname] = xr.DataArray(data, dims=dims, coords=c, name=vname, attrs=va)
        # crc32c per chunk (pipeline.chunk_checksums): a chunk changed on disk fails on read
        encoding[vname] = {
            "chunks": chunks,
            "_FillValue": np.float32(np.nan),
            "compressors": compressors(),
        }
    ds = _with_metadata(xr.Dataset(variables), like, attrs)
    ds.attrs["hyperdeq_complete"] = False
    try:
        ds.to_zarr(
            path, mode="w-", compute=False, zarr_format=3, consolidated=False, encoding=encoding
        )
    except (FileExistsError, ValueError) as exc:
        raise WriteError(
            f"cannot create output {str(path)!r}: {exc}; remove it or pick another folder"
        ) from exc
    _consolidate(path)
    return {v: str(path / v) for v in variables}


def _with_metadata(ds: xr.Dataset, like: xr.DataArray, attrs: dict[str, Any] | None) -> xr.Dataset:
    """CF/GeoZarr metadata on an output dataset: coordinate units, CRS (WKT2 in ``crs_wkt``),
    grid mapping, the scene's metadata, ``proj:*`` and ``attrs``."""
    for k, ca in {**_xy_attrs(like), **BAND_COORD_ATTRS}.items():
        if k in ds.coords:
            ds[k].attrs.update(ca)
    if like.rio.crs is not None:
        ds = ds.rio.write_crs(like.rio.crs).rio.write_transform(like.rio.transform())
        # CF's crs_wkt is OGC WKT (ISO 19162, i.e. WKT2); GDAL's WKT1 stays in the `spatial_ref` attribute
        ds["spatial_ref"].attrs["crs_wkt"] = like.rio.crs.to_wkt(version="WKT2_2019")
        for v in ds.data_vars:
            ds[v].attrs["grid_mapping"] = "spatial_ref"
            ds[v].encoding.pop("grid_mapping", None)
    ds.attrs["Conventions"] = CONVENTIONS
    ds.attrs.update(scene_metadata(like))
    if "acquisition_time" in ds.attrs:
        ds.attrs["time_coverage_start"] = ds.attrs["acquisition_time"]  # ACDD
    ds.attrs.update(geo_attrs(like))
    ds.attrs.update(attrs or {})
    return ds


def mark_complete(path: str | Path, **attrs: Any) -> None:
    """Set the store's completion marker (last, after every chunk is written); reconsolidates."""
    update_output_attrs(path, {**attrs, "hyperdeq_complete": True})


def open_output(path: str | Path, name: str) -> xr.DataArray:
    """Reopen one output variable lazily, with its CRS and transform."""
    ds = xr.open_zarr(path, consolidated=False, decode_coords="all", zarr_format=3)
    da = ds[name]
    if "spatial_ref" in ds.coords and "spatial_ref" not in da.coords:
        da = da.assign_coords(spatial_ref=ds["spatial_ref"])
    return da


# ---------------------------------------------------------------------------- COG
def spectral_band_metadata(like: xr.DataArray) -> dict[str, Any]:
    """``descriptions`` and ``band_tags`` for a COG holding ``like``'s bands (pass them to :func:`write_cog`).

    Per band: ``wavelength``, ``fwhm`` and ``wavelength_units`` (nm), ``good_band`` and ENVI's
    ``bbl`` (1 good, 0 bad), so that hyperdeq's own GeoTIFF reader (and ENVI-aware tools) read the
    wavelengths and bad bands back. The description names the wavelength and marks bad bands.
    """
    wl = np.asarray(like["wavelength"].values, dtype=float)
    fw = np.asarray(like["fwhm"].values, dtype=float)
    good = np.asarray(like["good_band"].values, dtype=bool)
    desc, tags = [], []
    for i, (w, f, g) in enumerate(zip(wl, fw, good, strict=True)):
        d = f"band {i + 1}: {w:.2f} {WAVELENGTH_UNITS}" if np.isfinite(w) else f"band {i + 1}"
        desc.append(d if g else f"{d} (bad band)")
        t: dict[str, Any] = {"good_band": int(g), "bbl": int(g)}
        if np.isfinite(w):
            t.update(wavelength=f"{w:.4f}", wavelength_units=WAVELENGTH_UNITS)
        if np.isfinite(f):
            t["fwhm"] = f"{f:.4f}"
        tags.append(t)
    return {"descriptions": desc, "band_tags": tags}


def write_cog(
    src_array: str | Path,
    dest: str | Path,
    like: xr.DataArray,
    *,
    descriptions: Sequence[str] | None = None,
    band_tags: Sequence[dict[str, Any]] | None = None,
    tags: dict[str, Any] | None = None,
    block: int = 256,
    units: str | None = "1",
) -> Path:
    """Write a zarr array (``(C, y, x)`` or ``(y, x)``) as a band-interleaved Cloud-Optimized GeoTIFF.

    Data move block by block (bounded memory) into a tiled GeoTIFF with overviews, which is then
    copied with ``COPY_SRC_OVERVIEWS`` so that the overviews precede the data (the COG layout).
    Dataset tags: :func:`scene_metadata` of ``like`` (acquisition time, reflectance scale, units,
    bad bands), then ``tags``. Band tags where wavelengths are known: also GDAL's ``IMAGERY`` ``CENTRAL_WAVELENGTH_UM`` /
    ``FWHM_UM``. ``units`` is every band's unit type ("1": dimensionless reflectance/fraction).
    No GDAL scale/offset is set: the values are already physical.
    """
    import rasterio
    import rasterio.shutil
    from rasterio.enums import Resampling

    dest = Path(dest)
    if dest.exists():
        raise WriteError(f"{str(dest)!r} already exists; remove it or use a new run directory")
    arr = zarr.open_array(str(src_array), mode="r")
    three_d = arr.ndim == 3
    count = arr.shape[0] if three_d else 1
    ny, nx = arr.shape[-2:]
    # GeoTIFF tiles are multiples of 16; never pad a small raster up to a large tile
    block = max(16, min(block, -(-max(ny, nx) // 16) * 16))
    crs = like.rio.crs
    transform = like.rio.transform() if crs is not None else None
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp.tif")
    profile = _cog_profile(nx, ny, count, crs, transform, block)
    from pipeline.readers.geotiff import GDAL_CACHE_MB

    try:
        # GDAL keeps dirty blocks in its cache (default 5 % of RAM) until the file closes: capped,
        # the writer's memory stays bounded instead of growing with the scene
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), rasterio.open(tmp, "w", **profile) as dst:
            _copy_blocks(arr, src_array, dst, block)
            _set_band_metadata(dst, count, descriptions, band_tags, units)
            _set_dataset_tags(dst, like, tags)
            factors = [f for f in (2, 4, 8, 16, 32) if min(ny, nx) // f >= 16]
            if factors:
                dst.build_overviews(factors, Resampling.average)
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
            rasterio.shutil.copy(
                tmp, dest, **{**_COG_COPY, "blockxsize": block, "blockysize": block}
            )
    except ChunkChecksumError:  # a damaged source, not a write failure: its message says what to do
        raise
    except Exception as exc:
        dest.unlink(missing_ok=True)
        raise WriteError(
            f"writing the GeoTIFF {str(dest)!r} failed: {exc}; check free space and permissions"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest


#: creation options of the final COG copy (overviews first: the COG layout)
_COG_COPY: dict[str, Any] = {
    "driver": "GTiff",
    "tiled": True,
    "interleave": "band",
    "compress": "deflate",
    "predictor": 3,
    "copy_src_overviews": True,
    "bigtiff": "IF_SAFER",
}


def _cog_profile(
    nx: int, ny: int, count: int, crs: Any, transform: Any, block: int
) -> dict[str, Any]:
    """Profile of the tiled float32 GeoTIFF the blocks are first written to (NaN nodata)."""
    return {
        "driver": "GTiff",
        "width": nx,
        "height": ny,
        "count": count,
        "dtype": "float32",
        "crs": crs,
        "transform": transform,
        "nodata": float("nan"),
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "interleave": "band",
        "compress": "deflate",
        "predictor": 3,
        "bigtiff": "IF_SAFER",
    }


def _set_dataset_tags(dst: Any, like: xr.DataArray, tags: dict[str, Any] | None) -> None:
    """Scene-level tags (:func:`scene_metadata` of ``like``, then ``tags``) in GDAL's default domain."""
    meta = scene_metadata(like)
    meta.pop("source", None)  # a path on the processing host
    if "acquisition_time" in meta:  # EnMAP's tag name: hyperdeq's GeoTIFF reader keeps it
        meta["start_time"] = meta["acquisition_time"]
    # (default domain: GDAL's COG copy drops dataset-level tags of other domains)
    dst.update_tags(**{k: _tag(v) for k, v in {**meta, **(tags or {})}.items()})


def _copy_blocks(arr: Any, src_array: str | Path, dst: Any, block: int) -> None:
    """Copy the zarr array ``arr`` into the open raster ``dst`` block by block (bounded memory).

    Each block is read checksum-checked, so a damaged staged output fails with a message that
    says to rerun rather than being written into the GeoTIFF.
    """
    from rasterio.windows import Window as RWindow

    three_d = arr.ndim == 3
    ny, nx = arr.shape[-2:]
    for y in range(0, ny, block):
        for x in range(0, nx, block):
            ys, xs = slice(y, min(y + block, ny)), slice(x, min(x + block, nx))
            data = read_checked(
                arr,
                (slice(None), ys, xs) if three_d else (ys, xs),
                store=Path(src_array).parent,
                array=Path(src_array).name,
                fix="the run's staged output is damaged: rerun the same command",
            )
            if not three_d:
                data = data[None]
            dst.write(data, window=RWindow(x, y, xs.stop - x, ys.stop - y))


def _set_band_metadata(
    dst: Any,
    count: int,
    descriptions: Sequence[str] | None,
    band_tags: Sequence[dict[str, Any]] | None,
    units: str | None,
) -> None:
    """Set each band's description, unit and tags on ``dst``.

    Band tags with a wavelength in nm are also written in GDAL's ``IMAGERY`` domain
    (``CENTRAL_WAVELENGTH_UM`` / ``FWHM_UM``) so GDAL-aware tools see the band centres.
    """
    for i in range(count):
        if descriptions is not None:
            dst.set_band_description(i + 1, str(descriptions[i]))
        if units is not None:
            dst.set_band_unit(i + 1, units)
        if band_tags is not None:
            bt = band_tags[i]
            dst.update_tags(i + 1, **{k: str(v) for k, v in bt.items()})
            imagery = {}
            if "wavelength" in bt and bt.get("wavelength_units", WAVELENGTH_UNITS) == "nm":
                imagery["CENTRAL_WAVELENGTH_UM"] = f"{float(bt['wavelength']) / 1000:.6f}"
                if "fwhm" in bt:
                    imagery["FWHM_UM"] = f"{float(bt['fwhm']) / 1000:.6f}"
            if imagery:
                dst.update_tags(i + 1, ns="IMAGERY", **imagery)


def _tag(v: Any) -> str:
    """A GeoTIFF tag value: lists as JSON, the rest as text."""
    import json

    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
