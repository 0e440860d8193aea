"""Blend overlapping tile outputs into the final scene, one task per output chunk.

Each task owns one spatial output chunk (all channels): it reads the outputs of the tiles whose
read windows overlap the chunk, weights them with the normalised blend window (accumulated in
float64, so an identity model blends back to its input bit for bit), masks nodata and writes the
chunk once. No two tasks touch the same chunk, memory per task is bounded by the tiles around one
chunk whatever the scene size, and the result does not depend on worker count or completion order
(tiles are summed in index order).

Before a stored tile is blended, the array read for blending is hashed and compared with the
sha256 its record holds (written with the tile): a tile whose bytes changed after the model stage
(bit rot, a stray write) raises :class:`~pipeline.errors.ProvenanceError` instead of being blended.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import GridError, ProvenanceError
from pipeline.grid import Tile, TileGrid, Window, tile_weight
from pipeline.tiles import DATA, read_tile, read_valid, records_dir, tile_checksum


@dataclass(frozen=True)
class BlendTarget:
    """Where channels ``channels`` of the tile outputs go: zarr array ``array`` at band positions ``bands``.

    A ``(y, x)`` target array takes the single channel ``channels[0]`` (``bands`` is ignored).
    """

    array: str
    channels: tuple[int, ...]
    bands: tuple[int, ...]


@dataclass(frozen=True)
class BlendJob:
    source: str
    valid_path: str
    grid: TileGrid
    ok_keys: frozenset[str]
    window: Window
    blend: str
    targets: tuple[BlendTarget, ...]
    #: ``(tile key, recorded sha256)`` of the tiles overlapping ``window``; None: not verified
    checksums: tuple[tuple[str, str | None], ...] | None = None
    #: per output channel, a weight ``w`` toward the model's input: ``out + w (input − out)``, the
    #: input blended from the input tile store (``valid_path``) exactly like the outputs (None: off)
    mix: tuple[float, ...] | None = None


def chunk_windows(shape: tuple[int, int], chunk: int) -> list[Window]:
    """The output chunks of a ``(y, x)`` scene, row-major."""
    ny, nx = shape
    return [
        Window(y, min(y + chunk, ny), x, min(x + chunk, nx))
        for y in range(0, ny, chunk)
        for x in range(0, nx, chunk)
    ]


def _check_tile(
    source: Any, tile: Tile, data: np.ndarray, checksums: Mapping[str, str | None]
) -> None:
    """Raise ProvenanceError unless ``data`` (as read for blending) hashes to the tile's recorded sha256."""
    want = checksums.get(tile.key)
    got = tile_checksum(data)
    if want == got:
        return
    where = str(source) if not callable(source) else "the tile source"
    rec = str(records_dir(source) / f"{tile.key}.json") if not callable(source) else "its record"
    what = (
        "no checksum is recorded for it"
        if not want
        else f"its data hashes to sha256 {got[:16]}... but {want[:16]}... was recorded when it was written"
    )
    raise ProvenanceError(
        f"refusing to blend tile {tile.key!r} of {where!r}: {what}, so the stored tile changed after the "
        f"model stage (corrupt storage or a stray write). Rerun the same command: tiles that fail their "
        f"checksum are recomputed (or delete the record {rec!r} to force it); if it happens again, check the disk"
    )


def blend_window(
    source: str | Path | Callable[[Tile], np.ndarray],
    grid: TileGrid,
    window: Window,
    blend: str,
    ok_keys: set[str] | frozenset[str] | None = None,
    valid: np.ndarray | None = None,
    checksums: Mapping[str, str | None] | None = None,
) -> np.ndarray:
    """Blend tile outputs over ``window``: ``(channels, h, w)`` float32, NaN = nodata.

    ``source`` is a tile-output store path, or a callable giving a tile's ``(channels, h, w)``
    output over its read window (in-memory use and tests). Pixels no tile covers are NaN.
    ``checksums`` (tile key -> sha256 recorded when the tile was written): each blended tile's
    data, as read, must hash to it, else :class:`ProvenanceError` (None: no check).
    """
    reader: Callable[[Tile], np.ndarray]
    if callable(source):
        reader = source
    else:
        path = source
        reader = lambda t: read_tile(path, grid, t)  # noqa: E731
    acc: np.ndarray | None = None
    wsum = np.zeros(window.shape, dtype=np.float64)
    for t in grid.overlapping(window):  # index order: deterministic sums
        if ok_keys is not None and t.key not in ok_keys:
            continue
        inter = t.read.intersect(window)
        assert inter is not None
        rel = inter.relative_to(t.read).slices
        w = tile_weight(t, blend)[rel]
        if not w.any():
            continue
        full = reader(t)
        if checksums is not None:  # the array is read anyway: hashing it costs one pass over it
            _check_tile(source, t, full, checksums)
        data = full[(slice(None), *rel)]
        if acc is None:
            acc = np.zeros((data.shape[0], *window.shape), dtype=np.float64)
        dst = (slice(None), *inter.relative_to(window).slices)
        acc[dst] += data.astype(np.float64) * w
        wsum[dst[1:]] += w
    if acc is None:
        n_ch = (
            zarr.open_array(str(Path(source) / DATA), mode="r").shape[1]
            if not callable(source)
            else 1
        )
        return np.full((n_ch, *window.shape), np.nan, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = acc / wsum
    out[:, wsum == 0] = np.nan
    if valid is not None:
        out[:, ~valid] = np.nan
    return out.astype(np.float32)


def blend_chunk(job: BlendJob) -> dict[str, Any]:
    """Task body: blend one output chunk and write it into every target array."""
    valid = read_valid(job.valid_path, job.window)
    rec: dict[str, Any] = {"window": [job.window.y0, job.window.y1, job.window.x0, job.window.x1]}
    if not valid.any():  # the arrays' fill value is already NaN
        rec["written"] = False
        return rec
    sums = dict(job.checksums) if job.checksums is not None else None
    out = blend_window(job.source, job.grid, job.window, job.blend, job.ok_keys, valid, sums)
    if job.mix is not None:
        inp = blend_window(job.valid_path, job.grid, job.window, job.blend, job.ok_keys, valid)
        if inp.shape != out.shape or len(job.mix) != out.shape[0]:
            raise GridError(
                f"cannot mix {len(job.mix)} weights of output {out.shape!r} with input {inp.shape!r}: "
                "the model's output channels must be its input bands"
            )
        w = np.asarray(job.mix, dtype=np.float32)[:, None, None]
        out = out + w * (inp - out)
    for tgt in job.targets:
        arr = zarr.open_array(tgt.array, mode="r+")
        if arr.ndim == 2:  # a single-channel (y, x) output
            arr[job.window.slices] = out[tgt.channels[0]]
            continue
        block = np.full((arr.shape[0], *job.window.shape), np.nan, dtype=np.float32)
        block[list(tgt.bands)] = out[list(tgt.channels)]
        arr[(slice(None), *job.window.slices)] = block
    rec["written"] = True
    rec["n_valid"] = int(valid.sum())
    return rec


def blend_stage(
    executor: Executor,
    source: str | Path,
    valid_path: str | Path,
    grid: TileGrid,
    targets: Sequence[BlendTarget],
    *,
    chunk: int,
    blend: str = "hann",
    ok_keys: set[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    checksums: Mapping[str, str | None] | None = None,
    mix: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Blend every output chunk (one task each) into the ``targets`` arrays (already created).

    Each target array must be chunked ``(bands, chunk, chunk)`` over the grid's shape, so that a
    task's window is exactly one chunk of every target. ``checksums``: the sha256 recorded for
    each tile when it was written; every tile is verified as it is read for blending (a mismatch
    raises :class:`ProvenanceError` naming the tile). Each task carries only the checksums of the
    tiles around its chunk. ``mix``: one weight per output channel toward the input tile store
    ``valid_path`` (DECSC's scene-wide band guard): ``out + w (input − out)``.
    """
    for tgt in targets:
        arr = zarr.open_array(tgt.array, mode="r")
        if tuple(arr.shape[-2:]) != grid.shape or tuple(arr.chunks[-2:]) != (chunk, chunk):
            raise GridError(
                f"blend target {tgt.array!r} has shape {arr.shape!r} / chunks {arr.chunks!r}; "
                f"expected (*, {grid.shape[0]}, {grid.shape[1]}) chunked (*, {chunk}, {chunk}). "
                "Create it with pipeline.writers.create_output_zarr(chunk=...)"
            )
    keys = frozenset(ok_keys) if ok_keys is not None else frozenset(t.key for t in grid.tiles)
    jobs = [
        BlendJob(
            str(source),
            str(valid_path),
            grid,
            keys,
            w,
            blend,
            tuple(targets),
            None
            if checksums is None
            else tuple((t.key, checksums.get(t.key)) for t in grid.overlapping(w) if t.key in keys),
            None if mix is None else tuple(float(v) for v in mix),
        )
        for w in chunk_windows(grid.shape, chunk)
    ]
    futures = [executor.submit(blend_chunk, j) for j in jobs]
    out = []
    for i, f in enumerate(futures, 1):
        out.append(f.result())
        if progress:
            progress(i, len(futures))
    return out
