"""Reopening hyperdeq zarr stores (written by :func:`pipeline.ingest.ingest_scene`).

Kept apart from :mod:`pipeline.ingest` so that the reader registry (:mod:`pipeline.readers`) can
open a hyperdeq store without importing the ingest module, which itself imports the readers: no
module imports in a cycle, not even lazily.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from pipeline import LOCAL_SCHEDULER
from pipeline.chunk_checksums import ChunkChecksumError, is_checksum_error
from pipeline.errors import ReadError
from pipeline.readers._base import SceneSource, check_path
from pipeline.scene import build_scene

#: the data variable of a hyperdeq scene store
VARIABLE = "reflectance"


def is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in ("zarr.json", ".zgroup", ".zarray"))


def is_hyperdeq_zarr(path: Path) -> bool:
    """True for zarr stores written by :func:`pipeline.ingest.ingest_scene` (complete or not)."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return "hyperdeq" in attrs


def _root_attrs(dest: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((dest / "zarr.json").read_text()).get("attributes", {}))
    except (OSError, ValueError) as exc:
        raise ReadError(
            f"cannot read the metadata of zarr store {str(dest)!r}: {exc}; the store is damaged, "
            "ingest the source again with overwrite=True."
        ) from exc


def store_metadata(path: str | Path) -> dict[str, Any]:
    """The ``hyperdeq`` root attrs of a store (provenance, progress, statistics)."""
    p = check_path(path)
    if not is_hyperdeq_zarr(p):
        raise ReadError(
            f"{str(p)!r} is not a hyperdeq zarr store (no 'hyperdeq' attrs); open other zarr stores "
            "with open_scene(path, format='zarr') or ingest them first."
        )
    return dict(_root_attrs(p)["hyperdeq"])


def open_zarr_scene(path: str | Path) -> xr.DataArray:
    """Reopen a store written by :func:`ingest_scene` as the canonical scene (dask-backed).

    Refuses stores whose ingest did not finish (``complete`` is written last).
    """
    p = Path(path).expanduser()
    meta = store_metadata(p)
    if not meta.get("complete", False):
        done = str(meta.get("progress", {}).get("done", ""))
        raise ReadError(
            f"zarr store {str(p)!r} is incomplete: its ingest stopped after {done.count('1')!r} of "
            f"{len(done)!r} regions. Re-run the same ingest command to resume it (or pass "
            "overwrite=True to start over)."
        )
    try:
        ds = xr.open_zarr(p, consolidated=False, chunks={}, mask_and_scale=False)
    except Exception as exc:
        raise ReadError(
            f"cannot open zarr store {str(p)!r}: {exc}; ingest the source again."
        ) from exc
    if VARIABLE not in ds.data_vars:
        raise ReadError(
            f"zarr store {str(p)!r} is damaged: its {VARIABLE!r} array is missing (arrays: "
            f"{sorted(map(str, ds.variables))!r}); ingest the source again with overwrite=True."
        )
    _check_chunks(p, meta)
    var = ds[VARIABLE]
    data = _guarded_data(p, var)
    # the per-band coordinates are dask-backed too: read them here (small), never through a
    # process-wide default Dask client
    band_coords = {}
    for k in ("wavelength", "fwhm", "good_band"):
        try:
            band_coords[k] = np.asarray(
                ds[k].data.compute(scheduler=LOCAL_SCHEDULER)
                if hasattr(ds[k].data, "compute")
                else ds[k].data
            )
        except Exception as exc:
            what = (
                "fails its crc32c checksum (its bytes changed on disk after it was written)"
                if is_checksum_error(exc)
                else f"does not decode ({type(exc).__name__}: {exc})"
            )
            raise ReadError(
                f"the {k!r} array of zarr store {str(p)!r} {what}; copy the store again or ingest "
                "the source again with overwrite=True."
            ) from exc
    from affine import Affine

    transform = Affine(*meta["transform"]) if meta.get("transform") else None
    attrs = dict(meta.get("scene_attrs", {}))
    attrs.update(store=str(p), store_sha256=meta.get("source_sha256"))
    for k in ("out_of_range_per_band", "nodata_bands", "valid_range"):  # issue 21's input policy
        if k in meta:
            attrs[k] = meta[k]
    for k in (
        "source",
        "reader",
        "source_scale_factor",
        "scale_factor",
        "nodata_convention",
        "crs_missing",
    ):
        attrs.pop(k, None)
    return build_scene(
        data,
        wavelength=band_coords["wavelength"],
        fwhm=band_coords["fwhm"],
        good_band=band_coords["good_band"].astype(bool),
        transform=transform,
        crs=meta.get("crs_wkt"),
        source=meta.get("source", ""),
        reader=meta.get("reader", ""),
        scale_factor=meta.get("scale_factor", 1.0),
        attrs=attrs,
    )


class _ChunkReadError(ReadError):
    """A data chunk of a store does not decode; keeps the window and the codec error."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


class _ChunkChecksumReadError(_ChunkReadError, ChunkChecksumError):
    """A data chunk of a store fails its crc32c checksum."""


class _StoreArray:
    """The store's data array for ``dask.array.from_array``, read straight through zarr.

    xarray's lazy zarr array lets a chunk that does not decode escape from ``.values`` as a bare
    codec ``RuntimeError``; here it is a :class:`ReadError` naming the store and the chunk.
    Picklable (path only: the opened array is not shipped), so dask can send it to workers; the
    array is opened once per process, not once per chunk.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], chunks: tuple[int, ...]) -> None:
        self.path = path
        self.shape = shape
        self.chunks = chunks
        self.dtype = np.dtype(np.float32)
        self.ndim = 3
        self._arr: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arr": None}

    def __getitem__(self, key: Any) -> np.ndarray:
        import zarr

        try:
            if self._arr is None:
                self._arr = zarr.open_array(str(self.path / VARIABLE), mode="r")
            return np.asarray(self._arr[key])
        except Exception as exc:
            _, ysl, xsl = (k if isinstance(k, slice) else slice(k, k + 1) for k in key)
            y0, y1, _ = ysl.indices(self.shape[1])
            x0, x1, _ = xsl.indices(self.shape[2])
            cy, cx = self.chunks[1], self.chunks[2]
            cy0, cx0 = y0 // cy * cy, x0 // cx * cx
            chunk = (
                f"the chunk of rows {cy0}:{min(cy0 + cy, self.shape[1])}, "
                f"cols {cx0}:{min(cx0 + cx, self.shape[2])}"
            )
            error = f"{type(exc).__name__}: {exc}"
            cls = _ChunkReadError
            if is_checksum_error(exc):
                key = f"c/0/{cy0 // cy}/{cx0 // cx}"
                error = (
                    f"chunk {VARIABLE}/{key} fails its crc32c checksum ({exc}): its bytes "
                    "changed on disk after it was written"
                )
                cls = _ChunkChecksumReadError
            raise cls(
                f"cannot read rows {y0}:{y1}, cols {x0}:{x1} ({chunk}) of zarr store "
                f"{str(self.path)!r}: {error}; the chunk is corrupt (an interrupted copy?). Copy "
                "the store again or ingest the source again with overwrite=True.",
                f"{chunk}: {error}",
            ) from exc


def _guarded_data(p: Path, var: xr.DataArray) -> Any:
    """A dask array over the store's chunks whose decode errors are ReadErrors (see _StoreArray)."""
    import dask.array as da
    from dask.base import tokenize

    chunks = tuple(int(c[0]) if len(c) else 1 for c in var.chunks or ())
    if len(chunks) != 3:
        return var.data
    mtime = (
        (p / VARIABLE / "zarr.json").stat().st_mtime_ns
        if (p / VARIABLE / "zarr.json").is_file()
        else 0
    )
    return da.from_array(
        _StoreArray(p, tuple(int(s) for s in var.shape), chunks),
        chunks=var.chunks,
        meta=np.empty((0, 0, 0), dtype=np.float32),
        asarray=False,
        lock=False,
        name=f"hyperdeq-store-{tokenize(str(p), mtime, var.shape, var.chunks)}",
    )


def _check_chunks(p: Path, meta: dict[str, Any]) -> None:
    """Every region the ingest recorded with valid pixels must have its chunk on disk.

    zarr reads a missing chunk as its fill value (NaN), so a store copied incompletely would
    otherwise turn data into nodata without a word. Regions without a valid pixel may lack their
    chunk (zarr does not write all-NaN chunks).
    """
    import zarr

    valid = [int(v) for v in meta.get("progress", {}).get("valid", [])]
    shape = meta.get("shape")
    if not valid or not shape:
        return
    try:
        arr: Any = zarr.open_array(str(p / VARIABLE), mode="r")
    except Exception as exc:
        raise ReadError(
            f"cannot open the {VARIABLE!r} array of zarr store {str(p)!r}: {exc}; ingest the source "
            "again with overwrite=True."
        ) from exc
    _, cy, cx = arr.chunks
    ny, nx = int(shape[1]), int(shape[2])
    keys = [(0, iy, ix) for iy in range(-(-ny // cy)) for ix in range(-(-nx // cx))]
    if len(keys) != len(valid):
        return  # a store of another layout: nothing to compare with
    missing = [
        (k, n)
        for k, n in zip(keys, valid, strict=True)
        if n > 0 and not (p / VARIABLE / arr.metadata.encode_chunk_key(k)).is_file()
    ]
    if missing:
        (_, iy, ix), n = missing[0]
        raise ReadError(
            f"zarr store {str(p)!r} is damaged: {len(missing)!r} of {len(keys)!r} data chunks are "
            f"missing, e.g. the chunk of rows {iy * cy}:{min((iy + 1) * cy, ny)}, cols "
            f"{ix * cx}:{min((ix + 1) * cx, nx)} that held {n!r} valid pixels when it was ingested "
            "(an incomplete copy?). Copy the store again or ingest the source again with overwrite=True."
        )


class ZarrSceneSource(SceneSource):
    """A hyperdeq store as a reader source (values are already canonical)."""

    reader = "zarr"

    def __init__(self, path: Path, **options: Any) -> None:
        from pipeline.readers._base import check_options

        check_options(self.reader, options, ())
        self.path = Path(path)
        self._scene = open_zarr_scene(path)
        m = store_metadata(path)
        self.shape = tuple(int(s) for s in self._scene.shape)  # type: ignore[assignment]
        self.raw_dtype = np.dtype(np.float32)
        self.wavelength = self._scene["wavelength"].values
        self.fwhm = self._scene["fwhm"].values
        self.good_band = self._scene["good_band"].values
        self.crs = m.get("crs_wkt")
        from affine import Affine

        self.transform = Affine(*m["transform"]) if m.get("transform") else None
        self.scale_factor = float(m.get("scale_factor", 1.0))
        self.scale_factor_source = str(m.get("scale_factor_source", "none"))
        self.attrs = {
            k: v
            for k, v in self._scene.attrs.items()
            if k
            not in (
                "source",
                "reader",
                "source_scale_factor",
                "scale_factor",
                "nodata_convention",
                "crs_missing",
            )
        }

    def read_raw(
        self, y0: int, y1: int, x0: int, x1: int, bands: np.ndarray | None = None
    ) -> np.ndarray:
        try:
            out = np.asarray(self._scene.data[:, y0:y1, x0:x1].compute(scheduler=LOCAL_SCHEDULER))
        except Exception as exc:  # a chunk that does not decode: truncated or overwritten
            detail = (
                exc.detail if isinstance(exc, _ChunkReadError) else f"{type(exc).__name__}: {exc}"
            )
            cls = ChunkChecksumError if isinstance(exc, ChunkChecksumError) else ReadError
            raise cls(
                f"cannot read rows {y0}:{y1}, cols {x0}:{x1} of zarr store {str(self.path)!r}: "
                f"{detail}; a chunk is corrupt (an interrupted copy?). Copy the "
                "store again or ingest the source again with overwrite=True."
            ) from exc
        return out if bands is None else out[bands]

    def read(
        self, y0: int, y1: int, x0: int, x1: int, out_of_range: np.ndarray | None = None
    ) -> np.ndarray:
        # already canonical: values outside the physical range were made nodata (and counted)
        # when the store was ingested
        return self.read_raw(y0, y1, x0, x1)

    def to_dataarray(self, chunk: int = 256) -> xr.DataArray:
        return self._scene
