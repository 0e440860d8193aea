"""Streaming ingest of any readable scene into a zarr v3 store, and reopening such stores.

Store layout (zarr v3, one group)::

    reflectance   float32 (band, y, x), chunks (all bands, chunk, chunk), blosc/zstd + crc32c, NaN = nodata
    wavelength, fwhm, good_band   1-D coords on band;  y, x   pixel-centre map coords
    spatial_ref   CF grid mapping (crs_wkt, spatial_ref, GeoTransform); reflectance.grid_mapping
    root attrs    "hyperdeq": provenance (source, sha256, reader, version, scale factor, chunk),
                  progress, value statistics and, written LAST, "complete": true;
                  GeoZarr-style "proj:wkt2" / "proj:epsg" / "proj:transform" / "proj:shape".

The store is created once from a lazy template (``to_zarr(compute=False)``), then filled one
chunk-aligned region at a time, each region read straight from the source window: peak memory is
one region, whatever the scene size. Each finished region is recorded in the root attrs, so an
interrupted ingest resumes where it stopped when re-run with the same source.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import xarray as xr

from pipeline.chunk_checksums import compressors
from pipeline.errors import ConfigError, InputValidationError, WriteError
from pipeline.hashing import sha256_path
from pipeline.readers import open_source
from pipeline.readers._base import REFLECTANCE_RANGE, SceneSource
from pipeline.readers.hyperdeq_zarr import (  # re-exported: the public names of this module
    VARIABLE,
    ZarrSceneSource,
    _root_attrs,
    is_hyperdeq_zarr,
    is_zarr_dir,
    open_zarr_scene,
    store_metadata,
)
from pipeline.scene import check_tileable

#: bump when the store layout changes
STORE_FORMAT = 1
Progress = Callable[[int, int], None]
#: blosc/zstd settings. Measured on the real EnMAP mosaic (one 224×256×256 region, 40 % NaN):
#: blosc's automatic block size (a few hundred KiB) halves zstd's ratio; 1 MiB blocks give
#: ratio 4.4 at level 1 for 1/5 of level 3's CPU time (level 3: same ratio).
COMPRESSOR: dict[str, Any] = {
    "cname": "zstd",
    "clevel": 1,
    "shuffle": "shuffle",
    "blocksize": 1 << 20,
}
#: the store of a scene is at least its float32 size divided by this (4.4 measured above; 20 leaves
#: room for scenes with much nodata): an ingest that cannot fit even then is refused before it starts
STORE_MAX_COMPRESSION = 20.0


def hyperdeq_version() -> str:
    """The installed package version (recorded in every store)."""
    try:
        from importlib.metadata import version

        return version("hyperdeq")
    except Exception:  # pragma: no cover - not installed
        return "0+unknown"


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _regions(ny: int, nx: int, chunk: int) -> list[tuple[int, int, int, int]]:
    return [
        (y0, min(y0 + chunk, ny), x0, min(x0 + chunk, nx))
        for y0 in range(0, ny, chunk)
        for x0 in range(0, nx, chunk)
    ]


def _template(src: SceneSource, chunk: int) -> tuple[xr.Dataset, dict[str, Any]]:
    """A lazy dataset with the final layout (no data read) and its root attrs."""
    import dask.array as da

    nb, ny, nx = src.shape
    ch = (nb, min(chunk, ny), min(chunk, nx))
    scene = src.build(da.zeros(src.shape, chunks=ch, dtype=np.float32))
    scene_attrs = {k: _jsonable(v) for k, v in scene.attrs.items()}
    var = scene.copy()
    var.attrs = {"long_name": "reflectance", "units": "1"}
    var.encoding = {}
    if "spatial_ref" in var.coords:
        var.attrs["grid_mapping"] = "spatial_ref"
    ds = var.to_dataset(name=VARIABLE)
    crs = scene.rio.crs
    transform = scene.rio.transform() if src.transform is not None else None
    attrs: dict[str, Any] = {
        "hyperdeq": {
            "store_format": STORE_FORMAT,
            "complete": False,
            "hyperdeq_version": hyperdeq_version(),
            "source": str(src.path),
            "reader": src.reader,
            "scale_factor": float(src.scale_factor),
            "scale_factor_source": src.scale_factor_source,
            "chunk": int(chunk),
            "shape": [int(s) for s in src.shape],
            "crs_missing": crs is None,
            "crs_wkt": crs.to_wkt() if crs is not None else None,
            "transform": list(transform)[:6] if transform is not None else None,
            "scene_attrs": scene_attrs,
        },
        "proj:wkt2": crs.to_wkt() if crs is not None else None,
        "proj:epsg": crs.to_epsg() if crs is not None else None,
        "proj:transform": list(transform)[:6] if transform is not None else None,
        "proj:shape": [int(ny), int(nx)],
    }
    return ds, attrs


def _encoding(ds: xr.Dataset, chunks: tuple[int, int, int]) -> dict[str, Any]:
    from zarr.codecs import BloscCodec, Crc32cCodec

    enc: dict[str, Any] = {
        VARIABLE: {
            "chunks": chunks,
            # crc32c last: a chunk whose bytes changed on disk fails its checksum on read (a
            # bit flip inside a blosc frame can otherwise decode to wrong values silently)
            "compressors": [BloscCodec(**COMPRESSOR), Crc32cCodec()],
            "fill_value": np.nan,
        }
    }
    for (
        name
    ) in ds.variables:  # the coordinates (band metadata, map coordinates) are checksummed too
        if name != VARIABLE:
            enc[str(name)] = {"compressors": compressors()}
    return enc


def _remove_store(dest: Path) -> None:
    if dest.is_dir():
        shutil.rmtree(dest, ignore_errors=True)
    elif dest.exists():
        dest.unlink()


def _check_free_space(dest: Path, shape: tuple[int, int, int]) -> None:
    """Refuse an ingest whose store cannot fit on the destination disk even at the best compression."""
    nb, ny, nx = shape
    need = nb * ny * nx * 4 / STORE_MAX_COMPRESSION
    try:
        free = shutil.disk_usage(dest.parent).free
    except OSError:
        return
    if need > free:
        raise WriteError(
            f"the scene declares {nb!r} bands x {ny!r} rows x {nx!r} columns ({nb * ny * nx * 4 / 2**30:.1f} "
            f"GiB as float32); its zarr store would need at least {need / 2**30:.1f} GiB but "
            f"{str(dest.parent)!r} has {free / 2**30:.1f} GiB free. Free disk space, ingest to another "
            "disk, or crop the scene first."
        )


def _recount_valid(
    arr: Any, regions: list[tuple[int, int, int, int]], good: np.ndarray
) -> list[int]:
    """Valid pixels per region over the bands ``good``, read back from the written store."""
    out = []
    for y0, y1, x0, x1 in regions:
        block = np.asarray(arr[:, y0:y1, x0:x1])  # one chunk: read (and checksummed) once
        ok = np.ones(block.shape[1:], dtype=bool)
        for g in good:
            ok &= np.isfinite(block[int(g)])
        out.append(int(ok.sum()))
        del block
    return out


Region = tuple[int, int, int, int]
#: one written region: (region index, valid pixel count, finite values per band, out-of-range values per band)
_Done = tuple[int, int, np.ndarray, np.ndarray]


@dataclass
class _FillState:
    """Which regions are written, their valid-pixel counts and the running per-band totals.

    Mirrors ``hyperdeq.progress`` in the root attrs, which is rewritten with the done flags after
    every batch of finished regions, so that an interrupted ingest resumes where it stopped.
    """

    done: list[str]
    valid: list[int]
    finite_total: np.ndarray
    oor_total: np.ndarray

    @classmethod
    def from_attrs(cls, prog: dict[str, Any], nb: int) -> _FillState:
        """The state recorded in a store's ``hyperdeq.progress`` attrs."""
        return cls(
            done=list(prog["done"]),
            valid=[int(v) for v in prog["valid"]],
            finite_total=np.asarray(prog.get("finite_per_band", [0] * nb), dtype=np.int64),
            oor_total=np.asarray(prog.get("out_of_range_per_band", [0] * nb), dtype=np.int64),
        )

    def as_attrs(self) -> dict[str, Any]:
        """The state as the ``hyperdeq.progress`` attrs."""
        return {
            "done": "".join(self.done),
            "valid": self.valid,
            "finite_per_band": self.finite_total.tolist(),
            "out_of_range_per_band": self.oor_total.tolist(),
        }


def _check_ingest_args(chunk: Any, workers: int) -> int:
    """The chunk size as an int, after refusing non-positive chunk sizes and worker counts."""
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ConfigError(f"chunk must be a positive integer number of pixels, got {chunk!r}.")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers!r}.")
    return int(chunk)


def _prepare_destination(
    dest: Path, source: SceneSource, sha: str, chunk: int, overwrite: bool
) -> bool:
    """Make ``dest`` ready for the ingest; return True when an interrupted ingest is to be resumed.

    A complete store, an interrupted ingest of another source or settings, and any other existing
    path are refused unless ``overwrite``; a non-empty non-zarr directory is never deleted. The
    destination folder is probed for writability before anything is written.
    """
    resume = False
    if dest.exists() or dest.is_symlink():
        if is_hyperdeq_zarr(dest) and not overwrite:
            h = _root_attrs(dest).get("hyperdeq", {})
            same = (
                h.get("source_sha256") == sha
                and h.get("chunk") == chunk
                and h.get("reader") == source.reader
                and h.get("shape") == list(source.shape)
            )
            if h.get("complete"):
                raise WriteError(
                    f"destination {str(dest)!r} exists (a complete hyperdeq store"
                    f"{' of the same source' if same else ''}); pass overwrite=True (--overwrite) "
                    "to replace it or choose another path."
                )
            if not same:
                raise WriteError(
                    f"destination {str(dest)!r} holds an interrupted ingest of another source or "
                    f"with other settings (sha256 {h.get('source_sha256')!r}, chunk {h.get('chunk')!r}); "
                    "pass overwrite=True (--overwrite) to restart it from scratch."
                )
            resume = True
        elif not overwrite:
            raise WriteError(
                f"destination {str(dest)!r} exists; pass overwrite=True (--overwrite) to replace it "
                "or choose another path."
            )
        elif dest.is_dir() and not is_zarr_dir(dest) and any(dest.iterdir()):
            raise WriteError(
                f"destination {str(dest)!r} is a non-empty directory that is not a zarr store; "
                "refusing to delete it even with overwrite=True. Choose another path."
            )
        else:
            _remove_store(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        probe = dest.parent / f".{dest.name}.write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise WriteError(
            f"cannot write to {str(dest)!r}: {exc.strerror or exc}; choose a writable folder "
            "(check permissions and free space)."
        ) from exc
    return resume


def _create_store(
    dest: Path, source: SceneSource, chunk: int, sha: str, regions: list[Region]
) -> None:
    """Create the empty store from the lazy template, with provenance and zeroed progress attrs."""
    import zarr

    nb, ny, nx = source.shape
    ch = (nb, min(chunk, ny), min(chunk, nx))
    ds, attrs = _template(source, chunk)
    attrs["hyperdeq"]["source_sha256"] = sha
    attrs["hyperdeq"]["progress"] = {
        "done": "0" * len(regions),
        "valid": [0] * len(regions),
        # running totals over the done regions (written with the done bits: resume-safe)
        "finite_per_band": [0] * nb,
        "out_of_range_per_band": [0] * nb,
    }
    try:
        ds.to_zarr(
            dest,
            mode="w-",
            compute=False,
            zarr_format=3,
            consolidated=False,
            encoding=_encoding(ds, ch),
        )
        zarr.open_group(dest, mode="r+").attrs.update(_jsonable(attrs))
    except OSError as exc:
        _remove_store(dest)
        raise WriteError(
            f"cannot create zarr store {str(dest)!r}: {exc}; choose a writable folder "
            "with enough free space."
        ) from exc


def _write_region(
    source: SceneSource,
    arr: Any,
    i: int,
    region: Region,
    good_set: set[int],
    block: np.ndarray,
    oor: np.ndarray,
) -> _Done:
    """Check one region's values, write its chunk; return (region, valid pixel count,
    finite values per band, out-of-range values per band)."""
    nb = source.shape[0]
    y0, y1, x0, x1 = region
    if np.isinf(block).any():  # in any band: bad bands must hold NaN or data, never inf
        b, yy, xx = (int(v) for v in np.argwhere(np.isinf(block))[0])
        raise InputValidationError(
            f"infinite value {block[b, yy, xx].item()!r} in {str(source.path)!r} at band "
            f"{b}, row {y0 + yy}, col {x0 + xx}; infinities are not valid "
            "reflectance. Mask them as nodata (NaN) or fix the scale factor."
        )
    ok = np.ones(block.shape[1:], dtype=bool)
    finite = np.zeros(nb, dtype=np.int64)
    for b in range(nb):  # band by band: no window-sized temporary
        fb = np.isfinite(block[b])
        finite[b] = int(np.count_nonzero(fb))
        if b in good_set:
            ok &= fb
    n_valid_region = int(ok.sum())
    arr[:, y0:y1, x0:x1] = block
    return i, n_valid_region, finite, oor


def _fill_regions(
    source: SceneSource,
    dest: Path,
    group: Any,
    meta: dict[str, Any],
    regions: list[Region],
    good_set: set[int],
    state: _FillState,
    workers: int,
    progress: Progress | None,
) -> None:
    """Read, check and write every region not yet done, recording progress in the root attrs.

    A region is recorded done only after its chunk is on disk, so a failed ingest resumes. Bad
    values remove the store (:class:`InputValidationError`); I/O failures become a resumable
    :class:`WriteError`.
    """
    nb = source.shape[0]
    arr: Any = group[VARIABLE]
    todo = [i for i, d in enumerate(state.done) if d != "1"]
    total = len(regions)
    n_done = total - len(todo)
    if progress is not None:
        progress(n_done, total)

    def _read(i: int) -> tuple[np.ndarray, np.ndarray]:
        oor = np.zeros(nb, dtype=np.int64)
        return source.read(*regions[i], out_of_range=oor), oor

    def _record(finished: set[Future[_Done]]) -> None:
        nonlocal n_done
        before = n_done
        for fut in finished:
            i, n_valid_region, finite, oor = fut.result()
            state.valid[i] = n_valid_region
            state.finite_total[:] += finite
            state.oor_total[:] += oor
            state.done[i] = "1"
            n_done += 1
        meta["progress"] = state.as_attrs()
        group.attrs["hyperdeq"] = meta
        if progress is not None:
            for n in range(before + 1, n_done + 1):  # one call per region
                progress(n, total)

    try:
        # a small pipeline: one window is read ahead while up to `workers` regions are checked,
        # compressed and written by threads (blosc releases the GIL); each chunk has exactly
        # one writer, and a region is recorded done only after its chunk is on disk
        with (
            ThreadPoolExecutor(max_workers=1) as readers,
            ThreadPoolExecutor(max_workers=workers) as writers,
        ):
            nxt = readers.submit(_read, todo[0]) if todo else None
            pending: set[Future[_Done]] = set()
            for k, i in enumerate(todo):
                assert nxt is not None
                block, oor = nxt.result()
                nxt = readers.submit(_read, todo[k + 1]) if k + 1 < len(todo) else None
                pending.add(
                    writers.submit(_write_region, source, arr, i, regions[i], good_set, block, oor)
                )
                del block
                if len(pending) >= workers:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    _record(finished)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                _record(finished)
    except InputValidationError:
        _remove_store(dest)
        raise
    except OSError as exc:
        raise WriteError(
            f"writing zarr store {str(dest)!r} failed: {exc}; free disk space or choose another "
            "folder, then re-run the same command to resume."
        ) from exc


def _mark_empty_bands(
    source: SceneSource,
    group: Any,
    meta: dict[str, Any],
    regions: list[Region],
    good_canon: np.ndarray,
    state: _FillState,
) -> list[int]:
    """Turn good bands without a single finite value into bad bands; return their indices.

    Such a band says nothing about any pixel, and as a good band it would make every pixel
    invalid: valid pixels are recounted without it and the user is warned (on the caller of
    :func:`ingest_scene`).
    """
    good = np.flatnonzero(good_canon)
    empty = [int(b) for b in good if state.finite_total[b] == 0]
    if empty and len(empty) < len(good):
        good_canon = good_canon.copy()
        good_canon[empty] = False
        state.valid = _recount_valid(group[VARIABLE], regions, np.flatnonzero(good_canon))
        group["good_band"][:] = good_canon
        meta["progress"] = {**meta["progress"], "valid": state.valid}
        order = source.band_order()
        wl = (
            source.wavelength
            if order is None or source.wavelength is None
            else np.asarray(source.wavelength)[order]
        )
        warnings.warn(
            f"{len(empty)!r} band(s) of {str(source.path)!r} hold no valid value (all nodata or out "
            f"of the physical range {REFLECTANCE_RANGE!r}): band(s) {empty[:10]!r}"
            f"{'...' if len(empty) > 10 else ''}"
            + (f" at {[round(float(wl[b]), 2) for b in empty[:10]]!r} nm" if wl is not None else "")
            + "; they are marked bad bands (good_band False) and not processed.",
            stacklevel=3,
        )
    return empty


def _finish_store(
    dest: Path,
    source: SceneSource,
    group: Any,
    meta: dict[str, Any],
    state: _FillState,
    empty: list[int],
) -> None:
    """Write the value statistics, refuse an all-nodata scene, then set the ``complete`` marker last."""
    _, ny, nx = source.shape
    meta["nodata_bands"] = empty
    meta["out_of_range_per_band"] = state.oor_total.tolist()
    meta["out_of_range_total"] = int(state.oor_total.sum())
    meta["valid_range"] = list(REFLECTANCE_RANGE)
    n_valid = int(sum(state.valid))
    if n_valid == 0:
        _remove_store(dest)
        raise InputValidationError(
            f"all-nodata scene: no pixel of {str(source.path)!r} has finite values in every good "
            f"band (nodata value {source.nodata!r}; {int(state.oor_total.sum())!r} values outside the "
            f"physical reflectance range {REFLECTANCE_RANGE!r} made nodata); check the nodata value, "
            "the scale factor or the crop."
        )
    meta["valid_pixels"] = n_valid
    meta["nodata_fraction"] = 1.0 - n_valid / float(ny * nx)
    group.attrs["hyperdeq"] = meta
    # the commit marker goes last, after every chunk and statistic is on disk
    meta["complete"] = True
    group.attrs["hyperdeq"] = meta


def ingest_scene(
    src: str | Path,
    dest: str | Path,
    *,
    chunk: int = 256,
    overwrite: bool = False,
    format: str | None = None,
    progress: Progress | None = None,
    workers: int = 2,
    source_sha256: str | None = None,
    **options: Any,
) -> Path:
    """Read ``src`` window by window and write it to the zarr v3 store ``dest``; return ``dest``.

    Values are checked per region (infinities → :class:`InputValidationError`; a scene without a
    single valid pixel → :class:`InputValidationError`). Values outside the physical reflectance
    range (:data:`pipeline.readers._base.REFLECTANCE_RANGE`) were made NaN by the reader; their
    count per band is stored in ``hyperdeq.out_of_range_per_band``. A good band without a single
    finite value becomes a bad band (``hyperdeq.nodata_bands``). Scenes below
    :data:`pipeline.scene.MIN_SCENE_SIZE` and stores that cannot fit the free disk are refused
    before anything is written (``docs/inputs.md``). An existing complete ``dest`` is refused
    unless ``overwrite``; an interrupted ingest of the same source (same sha256, chunk, reader) is
    resumed. ``source_sha256``: the input's digest when the caller already has it
    (:func:`pipeline.hashing.sha256_path`; computed here otherwise, never twice per run).
    ``progress(done, total)`` is called after every region. ``workers`` threads compress
    and write regions (peak memory ≈ (workers + 2) regions). ``options`` go to the reader.
    """
    chunk = _check_ingest_args(chunk, workers)
    source = open_source(src, format, **options)
    nb, ny, nx = source.shape
    if nb * ny * nx == 0:
        source.build(np.zeros(source.shape, np.float32))  # raises the zero-size error
    check_tileable(source.shape, source.path)
    dest = Path(dest).expanduser()
    if dest.resolve() == Path(source.path).resolve():
        raise WriteError(f"destination {str(dest)!r} is the source itself; choose another path.")
    sha = source_sha256 or sha256_path(source.path)
    resume = _prepare_destination(dest, source, sha, chunk, overwrite)
    _check_free_space(dest, (nb, ny, nx))

    import zarr

    regions = _regions(ny, nx, chunk)
    if not resume:
        _create_store(dest, source, chunk, sha, regions)
    group = zarr.open_group(dest, mode="r+")
    meta: dict[str, Any] = dict(cast(dict[str, Any], group.attrs["hyperdeq"]))
    state = _FillState.from_attrs(dict(meta["progress"]), nb)
    good_vec = np.asarray(
        source.good_band if source.good_band is not None else np.ones(nb, bool), bool
    )
    order = source.band_order()
    good_canon = good_vec if order is None else good_vec[order]
    good_set = {int(g) for g in np.flatnonzero(good_canon)}
    _fill_regions(source, dest, group, meta, regions, good_set, state, workers, progress)
    empty = _mark_empty_bands(source, group, meta, regions, good_canon, state)
    _finish_store(dest, source, group, meta, state, empty)
    return dest


__all__ = [
    "COMPRESSOR",
    "STORE_FORMAT",
    "VARIABLE",
    "ZarrSceneSource",
    "hyperdeq_version",
    "ingest_scene",
    "open_zarr_scene",
    "store_metadata",
]
