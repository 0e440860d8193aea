"""Georeferenced outputs: zarr v3 (template then region writes), COG, quicklook PNGs.

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


# ---------------------------------------------------------------------------- zarr
def geo_attrs(like: xr.DataArray) -> dict[str, Any]:
    """GeoZarr/STAC-projection style attributes (``proj:*``) of a georeferenced DataArray."""
    crs = like.rio.crs
    if crs is None:
        return {"crs_missing": True}
    t = like.rio.transform()
    out: dict[str, Any] = {
        "proj:wkt2": crs.to_wkt(),
        "proj:transform": [t.a, t.b, t.c, t.d, t.e, t.f],
        "proj:shape": [int(like.sizes["y"]), int(like.sizes["x"])],
        "grid_mapping": "spatial_ref",
    }
    epsg = crs.to_epsg()
    if epsg is not None:
        out["proj:code"] = f"EPSG:{epsg}"
    return out


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
) -> dict[str, str]:
    """Create a zarr v3 store holding ``name`` (and ``extra`` variables) on ``like``'s grid, empty.

    ``channel_dim`` None gives a ``(y, x)`` variable. ``channel_coords``: coordinates along the
    channel dim (the first entry's length is the channel count). Chunks are ``(all channels,
    chunk, chunk)``. Returns ``{variable: array path}`` for region writes. Refuses to overwrite.
    """
    path = Path(path)
    if path.exists():
        raise WriteError(f"output {str(path)!r} already exists; remove it or use a new run directory")
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
        variables[vname] = xr.DataArray(data, dims=dims, coords=c, name=vname)
        encoding[vname] = {"chunks": chunks, "_FillValue": np.float32(np.nan)}
    ds = xr.Dataset(variables)
    if like.rio.crs is not None:
        ds = ds.rio.write_crs(like.rio.crs).rio.write_transform(like.rio.transform())
        for v in ds.data_vars:
            ds[v].attrs["grid_mapping"] = "spatial_ref"
            ds[v].encoding.pop("grid_mapping", None)
    ds.attrs.update(geo_attrs(like))
    ds.attrs.update(attrs or {})
    ds.attrs["hyperdeq_complete"] = False
    try:
        ds.to_zarr(path, mode="w-", compute=False, zarr_format=3, consolidated=False, encoding=encoding)
    except (FileExistsError, ValueError) as exc:
        raise WriteError(f"cannot create output {str(path)!r}: {exc}; remove it or pick another folder") from exc
    return {v: str(path / v) for v in variables}


def mark_complete(path: str | Path, **attrs: Any) -> None:
    """Set the store's completion marker (last, after every chunk is written)."""
    g = zarr.open_group(str(path), mode="r+")
    g.attrs.update({**attrs, "hyperdeq_complete": True})


def open_output(path: str | Path, name: str) -> xr.DataArray:
    """Reopen one output variable lazily, with its CRS and transform."""
    ds = xr.open_zarr(path, consolidated=False, decode_coords="all", zarr_format=3)
    da = ds[name]
    if "spatial_ref" in ds.coords and "spatial_ref" not in da.coords:
        da = da.assign_coords(spatial_ref=ds["spatial_ref"])
    return da


# ---------------------------------------------------------------------------- COG
def write_cog(
    src_array: str | Path,
    dest: str | Path,
    like: xr.DataArray,
    *,
    descriptions: Sequence[str] | None = None,
    band_tags: Sequence[dict[str, Any]] | None = None,
    tags: dict[str, Any] | None = None,
    block: int = 256,
) -> Path:
    """Write a zarr array (``(C, y, x)`` or ``(y, x)``) as a band-interleaved Cloud-Optimized GeoTIFF.

    Data move block by block (bounded memory) into a tiled GeoTIFF with overviews, which is then
    copied with ``COPY_SRC_OVERVIEWS`` so that the overviews precede the data (the COG layout).
    """
    import rasterio
    import rasterio.shutil
    from rasterio.enums import Resampling
    from rasterio.windows import Window as RWindow

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
    profile = dict(
        driver="GTiff", width=nx, height=ny, count=count, dtype="float32", crs=crs,
        transform=transform, nodata=float("nan"), tiled=True, blockxsize=block, blockysize=block,
        interleave="band", compress="deflate", predictor=3, bigtiff="IF_SAFER",
    )
    from pipeline.readers.geotiff import GDAL_CACHE_MB

    try:
        # GDAL keeps dirty blocks in its cache (default 5 % of RAM) until the file closes: capped,
        # the writer's memory stays bounded instead of growing with the scene
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), rasterio.open(tmp, "w", **profile) as dst:
            for y in range(0, ny, block):
                for x in range(0, nx, block):
                    ys, xs = slice(y, min(y + block, ny)), slice(x, min(x + block, nx))
                    data = np.asarray(arr[:, ys, xs] if three_d else arr[ys, xs])
                    if not three_d:
                        data = data[None]
                    dst.write(data, window=RWindow(x, y, xs.stop - x, ys.stop - y))
            for i in range(count):
                if descriptions is not None:
                    dst.set_band_description(i + 1, str(descriptions[i]))
                if band_tags is not None:
                    dst.update_tags(i + 1, **{k: str(v) for k, v in band_tags[i].items()})
            if tags:
                dst.update_tags(**{k: str(v) for k, v in tags.items()})
            factors = [f for f in (2, 4, 8, 16, 32) if min(ny, nx) // f >= 16]
            if factors:
                dst.build_overviews(factors, Resampling.average)
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
            rasterio.shutil.copy(
                tmp, dest, driver="GTiff", tiled=True, blockxsize=block, blockysize=block,
                interleave="band", compress="deflate", predictor=3, copy_src_overviews=True,
                bigtiff="IF_SAFER",
            )
    except Exception as exc:
        dest.unlink(missing_ok=True)
        raise WriteError(f"writing the GeoTIFF {str(dest)!r} failed: {exc}; check free space and permissions") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------------------- quicklooks
def _stride(shape: tuple[int, ...], max_side: int) -> int:
    return max(1, -(-max(shape[-2:]) // max_side))


def _stretch(x: np.ndarray, lo_hi: tuple[float, float] | None = None) -> np.ndarray:
    fin = np.isfinite(x)
    if not fin.any():
        return np.zeros(x.shape, np.uint8)
    lo, hi = lo_hi if lo_hi is not None else np.percentile(x[fin], [2, 98])
    y = np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1)
    return np.where(fin, np.round(y * 255), 0).astype(np.uint8)


def rgb_bands(wavelength: np.ndarray, good: np.ndarray, targets: Sequence[float] = (640.0, 550.0, 460.0)) -> list[int]:
    """Band positions nearest to red/green/blue among good bands (first/middle/last if unknown)."""
    idx = np.flatnonzero(good)
    wl = np.asarray(wavelength, dtype=float)[idx]
    if not np.isfinite(wl).all():
        return [int(idx[-1]), int(idx[len(idx) // 2]), int(idx[0])]
    return [int(idx[np.argmin(np.abs(wl - t))]) for t in targets]


def quicklook_rgb(src_array: str | Path, bands: Sequence[int], dest: str | Path, max_side: int = 1024) -> Path:
    """An RGBA PNG (nodata transparent) of three bands, 2–98 % stretched, decimated to ``max_side``."""
    from PIL import Image

    arr = zarr.open_array(str(src_array), mode="r")
    s = _stride(arr.shape, max_side)
    chans = [np.asarray(arr[b, ::s, ::s], dtype=np.float32) for b in bands]
    alpha = np.where(np.all([np.isfinite(c) for c in chans], axis=0), 255, 0).astype(np.uint8)
    rgba = np.dstack([_stretch(c) for c in chans] + [alpha])
    Image.fromarray(rgba, "RGBA").save(dest, optimize=False)
    return Path(dest)


def quicklook_abundances(src_array: str | Path, dest: str | Path, max_side: int = 512, gap: int = 4) -> Path:
    """Abundance maps side by side as greyscale panels (0 black, 1 white; nodata transparent)."""
    from PIL import Image

    arr = zarr.open_array(str(src_array), mode="r")
    s = _stride(arr.shape, max_side)
    panels = [np.asarray(arr[p, ::s, ::s], dtype=np.float32) for p in range(arr.shape[0])]
    h, w = panels[0].shape
    canvas = np.zeros((h, len(panels) * (w + gap) - gap, 2), np.uint8)
    for i, p in enumerate(panels):
        x0 = i * (w + gap)
        canvas[:, x0 : x0 + w, 0] = _stretch(p, (0.0, 1.0))
        canvas[:, x0 : x0 + w, 1] = np.where(np.isfinite(p), 255, 0)
    Image.fromarray(canvas, "LA").save(dest, optimize=False)
    return Path(dest)
