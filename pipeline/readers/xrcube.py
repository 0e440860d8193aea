"""Cubes that xarray can open: NetCDF / HDF5 (CF grid mapping) and zarr stores from other tools.

The data variable is ``variable=`` or the only 3-D numeric variable. Dimensions are recognised by
name (``band``/``wavelength``/…, ``y``/``lat``/``row``…, ``x``/``lon``/``col``…); ``dims=`` gives
them explicitly as ``(band_dim, y_dim, x_dim)`` (or ``"band_dim,y_dim,x_dim"``). Without names,
the band dim is the one carrying a wavelength coordinate; failing that the reader refuses rather
than guess from sizes. CRS comes from the CF ``grid_mapping`` (via
rioxarray), the transform from the regular ``x``/``y`` coordinates. CF ``scale_factor`` /
``_FillValue`` are decoded by xarray (fill → NaN).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from pipeline.errors import ConfigError, InputValidationError, ReadError
from pipeline.readers._base import SceneSource, check_options, wavelengths_to_nm

OPTIONS: tuple[str, ...] = ("variable", "dims", "layout")
_BAND = ("band", "bands", "wavelength", "wavelengths", "lambda", "spectral", "channel", "z", "bnd")
_Y = ("y", "lat", "latitude", "row", "rows", "line", "lines", "northing")
_X = ("x", "lon", "longitude", "col", "cols", "column", "columns", "sample", "samples", "easting")


def _find_dim(dims: tuple[str, ...], names: tuple[str, ...]) -> str | None:
    low = {d.lower(): d for d in dims}
    for n in names:
        if n in low:
            return low[n]
    return None


class XarraySource(SceneSource):
    """A cube opened with xarray (lazy backend indexing); each read reopens the file."""

    def __init__(self, path: Path, reader: str, **options: Any) -> None:
        check_options(reader, options, OPTIONS)
        self.reader = reader
        self.path = path
        self.attrs = {}
        ds = self._open()
        try:
            self._setup(ds, options)
        finally:
            ds.close()
        if self.shape[0] * self.shape[1] * self.shape[2]:
            self.resolve_scale(options.get("scale_factor"), None, "")

    # -- opening --------------------------------------------------------------------------
    def _open(self) -> xr.Dataset:
        try:
            if self.reader == "zarr":
                with warnings.catch_warnings():
                    # stores from other tools may or may not consolidate their metadata
                    warnings.simplefilter("ignore", RuntimeWarning)
                    return xr.open_zarr(
                        self.path, consolidated=None, chunks=None, decode_coords="all"
                    )
            engine = (
                "h5netcdf" if self.path.suffix.lower() in (".h5", ".hdf5", ".he5", ".hdf") else None
            )
            kw: dict[str, Any] = {"phony_dims": "sort"} if engine == "h5netcdf" else {}
            return xr.open_dataset(self.path, engine=engine, decode_coords="all", **kw)
        except Exception as exc:
            raise ReadError(
                f"cannot open {str(self.path)!r} as {self.reader}: {exc}. Check that the file is a "
                "complete NetCDF/HDF5 (or zarr) cube, or pass format= explicitly."
            ) from exc

    def _setup(self, ds: xr.Dataset, options: dict[str, Any]) -> None:
        """Pick the cube variable in ``ds`` and read its layout, band metadata and georeferencing."""
        name, var = self._select_variable(ds, options)
        self.variable = name
        self.attrs["variable"] = name
        self.dims = self._resolve_dims(var, name, options)
        bdim, ydim, xdim = self.dims
        self.shape = (var.sizes[bdim], var.sizes[ydim], var.sizes[xdim])
        self.raw_dtype = np.dtype(var.dtype)
        fill = var.encoding.get("_FillValue")
        self.nodata = options.get("nodata", None if self.raw_dtype.kind == "f" else fill)
        self._read_band_metadata(var, bdim)
        crs = self._read_georeferencing(var, ydim, xdim)
        if self.reader == "zarr" and crs is None:
            self.attrs["foreign_zarr"] = True

    def _select_variable(self, ds: xr.Dataset, options: dict[str, Any]) -> tuple[Any, xr.DataArray]:
        """The cube's ``(name, variable)``: ``variable=``, else the only 3-D numeric one; checked to be a real 3-D cube."""
        name = options.get("variable")
        if name is None:
            cands = [
                k
                for k, v in ds.data_vars.items()
                if v.ndim == 3 and np.dtype(v.dtype).kind in "iuf"
            ]
            if len(cands) != 1:
                desc = {k: tuple(v.dims) for k, v in ds.data_vars.items()}
                raise InputValidationError(
                    f"{str(self.path)!r}: expected exactly one 3-D numeric variable, found "
                    f"{cands!r} among {desc!r}; pass variable=<name>."
                )
            name = cands[0]
        if name not in ds.data_vars:
            raise InputValidationError(
                f"variable {name!r} not found in {str(self.path)!r}; variables: "
                f"{sorted(map(str, ds.data_vars))!r}. Pass variable=<one of these>."
            )
        var = ds[name]
        if np.dtype(var.dtype).kind not in "iuf":
            raise InputValidationError(
                f"variable {name!r} of {str(self.path)!r} has non-numeric dtype {str(var.dtype)!r}; "
                "hyperdeq reads real integer or floating-point cubes only."
            )
        if var.ndim != 3:
            raise InputValidationError(
                f"variable {name!r} of {str(self.path)!r} has dims {var.dims!r}; a cube needs 3."
            )
        return name, var

    def _resolve_dims(
        self, var: xr.DataArray, name: Any, options: dict[str, Any]
    ) -> tuple[str, ...]:
        """``(band, y, x)`` dim names: from ``dims=`` (tuple or comma-separated), else identified from ``var``."""
        dims = options.get("dims")
        if isinstance(dims, str):  # "band_dim,y_dim,x_dim" (the zarr reader's layout= style)
            dims = tuple(d.strip() for d in dims.split(","))
        if dims is None:
            dims = self._identify_dims(var, str(name))
        if len(set(dims)) != 3 or not set(dims) <= set(map(str, var.dims)):
            raise InputValidationError(
                f"dims {tuple(dims)!r} do not name the three dims {var.dims!r} of {name!r}; "
                "pass dims=(band_dim, y_dim, x_dim)."
            )
        return tuple(dims)

    def _read_band_metadata(self, var: xr.DataArray, bdim: str) -> None:
        """Set wavelength, FWHM (nm) and good-band mask from 1-D coordinates on the band dim (or a ``wavelength`` attribute)."""

        def band_coord(*names: str) -> tuple[np.ndarray | None, str | None]:
            for n in names:
                for cname, c in var.coords.items():
                    if str(cname).lower() == n and c.dims == (bdim,):
                        return np.asarray(c.values), c.attrs.get("units")
            return None, None

        wl, wl_units = band_coord("wavelength", "wavelengths", "lambda", "wl")
        if (
            wl is None
            and "wavelength" in var.attrs
            and np.size(var.attrs["wavelength"]) == self.shape[0]
        ):
            wl, wl_units = np.asarray(var.attrs["wavelength"]), var.attrs.get("wavelength_units")
        fw, fw_units = band_coord("fwhm")
        gb, _ = band_coord("good_band", "bbl")
        self.wavelength = wavelengths_to_nm(
            None if wl is None else wl.astype(np.float64), wl_units, source=self.path
        )
        self.fwhm = (
            None
            if fw is None
            else wavelengths_to_nm(
                None if fw_units else (None if wl is None else wl.astype(np.float64)),
                fw_units or wl_units,
                source=self.path,
                fwhm=fw.astype(np.float64),
            )
        )
        self.good_band = None if gb is None else gb.astype(bool)

    def _read_georeferencing(self, var: xr.DataArray, ydim: str, xdim: str) -> Any:
        """Set CRS (CF grid mapping) and transform (regular x/y coordinates); return the CRS or None.

        A transform that cannot be computed is left None rather than failing the read.
        """
        self.crs, self.transform = None, None
        try:
            crs = var.rio.crs
        except Exception:
            crs = None
        if crs is not None:
            self.crs = crs
            self._check_regular(var, ydim, xdim)
            try:
                self.transform = var.rio.set_spatial_dims(x_dim=xdim, y_dim=ydim).rio.transform(
                    recalc=True
                )
            except Exception:
                self.transform = None
        return crs

    def _identify_dims(self, var: xr.DataArray, name: str) -> tuple[str, str, str]:
        """``(band, y, x)`` dims from names, then band metadata; refuses to guess from sizes.

        The band dim is the one named like a band axis, else the only dim carrying a wavelength
        (or fwhm / bad-band) coordinate or matching the size of a ``wavelength`` attribute, else
        the one left when y and x are named. Sizes decide nothing: crops often have more bands
        than rows, so "the smallest dim is the band axis" would silently read rows as bands.
        y and x, when unnamed, are the other two dims in stored order (rows before columns).
        """
        order = tuple(map(str, var.dims))
        b, y, x = (_find_dim(order, n) for n in (_BAND, _Y, _X))
        if b is None:
            meta = ("wavelength", "wavelengths", "lambda", "wl", "fwhm", "good_band", "bbl")
            tagged = {
                str(c.dims[0])
                for cname, c in var.coords.items()
                if str(cname).lower() in meta and c.ndim == 1 and str(c.dims[0]) in order
            }
            if not tagged and "wavelength" in var.attrs:
                n = int(np.size(var.attrs["wavelength"]))
                tagged = {d for d in order if var.sizes[d] == n}
            if len(tagged) == 1:
                b = tagged.pop()
                self.attrs["band_dim_from"] = "band metadata"
            elif y is not None and x is not None and y != x:
                b = next(d for d in order if d not in (y, x))
        if b is None:
            sizes = {d: int(var.sizes[d]) for d in order}
            raise InputValidationError(
                f"cannot tell which dim of variable {name!r} in {str(self.path)!r} is the band axis: "
                f"its dims {sizes!r} have no recognised names (band/wavelength/..., y/lat/row/..., "
                "x/lon/col/...) and no wavelength coordinate, and sizes do not say it (a crop can "
                "have more bands than rows). Pass dims=(band_dim, y_dim, x_dim), e.g. "
                f"dims={order!r} if {order[0]!r} is the band axis, or dims="
                f"{(order[2], order[0], order[1])!r} if the bands are last (command line: "
                f"--dims {','.join(order)!r} or --dims {','.join((order[2], order[0], order[1]))!r})."
            )
        if y is None or x is None or len({b, y, x}) != 3:
            rest = [d for d in order if d != b]
            y, x = (y if y in rest else rest[0]), (x if x in rest else rest[-1])
            if y == x:
                y, x = rest[0], rest[-1]
            self.attrs["dims_guessed"] = True
        return b, y, x

    def _check_regular(self, var: xr.DataArray, ydim: str, xdim: str) -> None:
        """Map coordinates must be evenly spaced: an affine transform cannot describe anything else."""
        for dim in (ydim, xdim):
            if dim not in var.coords or var[dim].ndim != 1 or var.sizes[dim] < 3:
                continue
            raw = np.asarray(var[dim].values)
            if raw.dtype.kind not in "iuf":
                continue
            c = raw.astype(np.float64)
            steps = np.diff(c)
            # tolerate rounding: 0.1 % of a pixel, or a few ulps of the stored (maybe float32) values
            eps = np.finfo(raw.dtype).eps if raw.dtype.kind == "f" else 0.0
            tol = max(1e-3 * abs(float(steps[0])), 8.0 * eps * float(np.nanmax(np.abs(c))))
            if not np.isfinite(steps).all() or float(np.abs(steps - steps[0]).max()) > tol:
                raise InputValidationError(
                    f"the {dim!r} coordinates of {str(self.path)!r} are not evenly spaced (steps "
                    f"from {float(np.nanmin(steps))!r} to {float(np.nanmax(steps))!r}); hyperdeq "
                    "needs a regular grid to georeference the outputs. Resample the scene to a "
                    "regular grid first (e.g. gdalwarp or rioxarray's reproject)."
                )

    def read_raw(
        self, y0: int, y1: int, x0: int, x1: int, bands: np.ndarray | None = None
    ) -> np.ndarray:
        bdim, ydim, xdim = self.dims
        ds = self._open()
        try:
            var = ds[self.variable].isel({ydim: slice(y0, y1), xdim: slice(x0, x1)})
            out = np.asarray(var.transpose(bdim, ydim, xdim).values)
            return out if bands is None else out[bands]
        finally:
            ds.close()


def open_netcdf(path: Path, **options: Any) -> XarraySource:
    """Open a NetCDF/HDF5 cube with a CF grid mapping."""
    return XarraySource(path, "netcdf", **options)


def open_foreign_zarr(path: Path, **options: Any) -> XarraySource:
    """Open a zarr store not written by hyperdeq (xarray layout); CRS usually missing."""
    return XarraySource(path, "zarr", **options)


class BareZarrSource(SceneSource):
    """A zarr array (or a group holding one 3-D array) without xarray dimension names.

    Other tools often write a plain array: no dims, no coordinates, no CRS. ``layout="band,y,x"``
    or ``"y,x,band"`` says where the band axis is; without it, ``(band, y, x)`` is assumed (the
    canonical order; no size heuristic is reliable: small crops have more bands than rows). The
    scene is flagged ``crs_missing`` and ``dims_guessed``.
    """

    reader = "zarr"

    def __init__(self, path: Path, **options: Any) -> None:
        import zarr

        check_options(self.reader, options, ("variable", "layout"))
        self.path = path
        self.attrs = {"foreign_zarr": True, "dims_guessed": True}
        try:
            node = zarr.open(str(path), mode="r")
        except Exception as exc:
            raise ReadError(
                f"cannot open zarr store {str(path)!r}: {exc}; check the store."
            ) from exc
        name = options.get("variable")
        if isinstance(node, zarr.Group):
            arrays = {k: a for k, a in node.arrays() if a.ndim == 3}
            if name is None and len(arrays) != 1:
                raise InputValidationError(
                    f"zarr store {str(path)!r} holds {len(arrays)!r} 3-D arrays "
                    f"({sorted(arrays)!r}); pass variable=<name>."
                )
            name = name or next(iter(arrays))
            if name not in arrays:
                raise InputValidationError(
                    f"array {name!r} not found in zarr store {str(path)!r}; 3-D arrays: "
                    f"{sorted(arrays)!r}. Pass variable=<one of these>."
                )
            self.variable: str | None = name
            arr = arrays[name]
        else:
            self.variable = None
            arr = node
        if arr.ndim != 3:
            raise InputValidationError(
                f"zarr array {str(path)!r} has shape {arr.shape!r}; a cube needs 3 dims."
            )
        self.raw_dtype = np.dtype(arr.dtype)
        if self.raw_dtype.kind not in "iuf":
            raise InputValidationError(
                f"non-numeric data type {str(self.raw_dtype)!r} in zarr store {str(path)!r}; "
                "hyperdeq reads real integer or floating-point cubes only."
            )
        layout = str(options.get("layout") or "").replace(" ", "").lower()
        if layout not in ("", "band,y,x", "y,x,band"):
            raise ConfigError(f"layout must be 'band,y,x' or 'y,x,band', got {layout!r}.")
        self.band_last = layout == "y,x,band"
        if layout:
            self.attrs["dims_guessed"] = False
        s = arr.shape
        self.shape = (s[2], s[0], s[1]) if self.band_last else (s[0], s[1], s[2])
        fill = getattr(arr, "fill_value", None)
        self.nodata = options.get(
            "nodata", None if self.raw_dtype.kind == "f" or fill is None else float(fill)
        )
        self.attrs["layout"] = "y, x, band" if self.band_last else "band, y, x"
        if self.shape[0] * self.shape[1] * self.shape[2]:
            self.resolve_scale(options.get("scale_factor"), None, "")

    def _array(self) -> Any:
        import zarr

        node: Any = zarr.open(str(self.path), mode="r")
        return node[self.variable] if self.variable is not None else node

    def read_raw(
        self, y0: int, y1: int, x0: int, x1: int, bands: np.ndarray | None = None
    ) -> np.ndarray:
        arr = self._array()
        if self.band_last:
            out = np.moveaxis(np.asarray(arr[y0:y1, x0:x1, :]), 2, 0)
        else:
            out = np.asarray(arr[:, y0:y1, x0:x1])
        return out if bands is None else out[bands]
