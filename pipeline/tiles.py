"""Overlapping tile stores (zarr v3).

The scene is cut once into an *input tile store*: array ``data`` of shape
``(n_slots, channels, RH, RW)`` chunked ``(1, channels, RH, RW)``, so that each tile's read window
is one contiguous chunk (a worker reads exactly one chunk; edge tiles are NaN-padded). ``valid``
holds the scene's validity mask. Each model stage writes an *output tile store* of the same layout
plus one JSON record per tile (written after its data: the tile's commit marker) holding the sha256
of the bytes written, so that a truncated or corrupted tile output is detected and recomputed.
Every chunk also carries a crc32c checksum (:mod:`pipeline.chunk_checksums`), verified on read.

Big arrays never leave the worker that made them: workers open the stores by path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from pipeline import LOCAL_SCHEDULER
from pipeline.chunk_checksums import compressors, read_checked
from pipeline.errors import GridError, WriteError
from pipeline.grid import Tile, TileGrid, plan_grid
from pipeline.records import TileRecord
from pipeline.scene import check_tileable

DATA = "data"
VALID = "valid"
COMPLETE_ATTR = "hyperdeq_complete"


# ---------------------------------------------------------------------------- helpers
def tile_checksum(arr: np.ndarray) -> str:
    """sha256 over the shape and the float32 C-order bytes of a tile's data."""
    a = np.ascontiguousarray(arr, dtype=np.float32)
    h = hashlib.sha256(repr(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def grid_to_attrs(grid: TileGrid) -> dict[str, Any]:
    return grid.to_dict()


def grid_from_attrs(d: dict[str, Any]) -> TileGrid:
    """Rebuild a grid from its stored description (pure geometry, so this is exact)."""
    full = plan_grid(tuple(d["shape"]), int(d["tile"]), int(d["halo"]))
    skipped = set(d.get("skipped", []))
    run = tuple(t for t in full.tiles if t.key not in skipped)
    skip = tuple(t for t in full.tiles if t.key in skipped)
    return TileGrid(full.shape, full.tile, full.halo, run, skip)


def _pad(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    c, h, w = arr.shape
    if (h, w) == shape:
        return np.ascontiguousarray(arr, dtype=np.float32)
    out = np.full((c, *shape), np.nan, dtype=np.float32)
    out[:, :h, :w] = arr
    return out


def _create_tile_array(
    path: Path, grid: TileGrid, n_channels: int, attrs: dict[str, Any], overwrite: bool
) -> zarr.Array:
    rh, rw = grid.max_read_shape
    n_slots = grid.n_rows * grid.n_cols
    try:
        root = zarr.open_group(str(path), mode="w" if overwrite else "w-", zarr_format=3)
    except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as exc:
        raise WriteError(
            f"tile store {str(path)!r} already exists; pass overwrite=True or remove it"
        ) from exc
    arr = root.create_array(
        DATA,
        shape=(n_slots, n_channels, rh, rw),
        chunks=(1, n_channels, rh, rw),
        dtype="float32",
        fill_value=np.nan,
        dimension_names=("tile", "channel", "ty", "tx"),
        compressors=compressors(),  # + crc32c per chunk, verified on read (read_tile)
    )
    root.attrs.update({"grid": grid_to_attrs(grid), **attrs, COMPLETE_ATTR: False})
    return arr


def is_complete(path: str | Path) -> bool:
    """True when the store at ``path`` exists and carries its completion marker."""
    try:
        return bool(zarr.open_group(str(path), mode="r").attrs.get(COMPLETE_ATTR, False))
    except Exception:
        return False


def store_attrs(path: str | Path) -> dict[str, Any]:
    return dict(zarr.open_group(str(path), mode="r").attrs)


def open_grid(path: str | Path) -> TileGrid:
    """The grid a tile store was written for."""
    return grid_from_attrs(store_attrs(path)["grid"])


# ---------------------------------------------------------------------------- input tiles
def write_input_tiles(
    scene: xr.DataArray,
    grid: TileGrid,
    path: str | Path,
    *,
    bands: np.ndarray | None = None,
    overwrite: bool = False,
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Cut ``scene`` (``band, y, x``) into the input tile store at ``path``; returns the path.

    ``bands`` selects band positions (default: all). One tile is in memory at a time. The store is
    marked complete only after every tile and the validity mask are written.
    """
    path = Path(path)
    check_tileable(scene.shape, scene.attrs.get("source", ""))
    if tuple(scene.shape[1:]) != grid.shape:
        raise GridError(
            f"scene shape {tuple(scene.shape[1:])!r} does not match the grid shape {grid.shape!r}; "
            "plan the grid from this scene"
        )
    sel = np.arange(scene.shape[0]) if bands is None else np.asarray(bands, dtype=int)
    sub = scene.isel(band=sel)
    arr = _create_tile_array(path, grid, len(sel), dict(attrs or {}), overwrite)
    root = zarr.open_group(str(path), mode="r+")
    rh, rw = grid.max_read_shape
    checksums: dict[str, str] = {}
    for t in grid.tiles:
        block = np.asarray(
            sub.isel(y=t.read.slices[0], x=t.read.slices[1]).values, dtype=np.float32
        )
        arr[grid.position(t)] = _pad(block, (rh, rw))
        checksums[t.key] = tile_checksum(block)
    root.attrs.update({"band_index": [int(b) for b in sel], "checksums": checksums})
    root.attrs[COMPLETE_ATTR] = True
    return path


def write_valid_mask(valid: Any, path: str | Path, chunk: int) -> None:
    """Store the scene's validity mask beside the tiles (read by the blend tasks).

    ``valid`` may be numpy or dask (then it is written chunk by chunk, never whole in memory).
    """
    root = zarr.open_group(str(path), mode="r+")
    v = root.create_array(
        VALID,
        shape=tuple(valid.shape),
        chunks=(chunk, chunk),
        dtype="bool",
        fill_value=False,
        dimension_names=("y", "x"),
        overwrite=True,
        compressors=compressors(),
    )
    if hasattr(valid, "rechunk"):
        import dask.array as dsa

        dsa.store(
            valid.astype(bool).rechunk((chunk, chunk)),
            v,  # type: ignore[arg-type]
            lock=False,
            scheduler=LOCAL_SCHEDULER,
        )
    else:
        v[...] = np.asarray(valid, dtype=bool)


def tile_validity(valid: Any, tile: int) -> np.ndarray:
    """One bool per tile core ("holds a valid pixel"), computed block-wise for dask masks."""
    if hasattr(valid, "rechunk"):
        blocks = valid.astype(bool).rechunk((tile, tile))
        return np.asarray(
            blocks.map_blocks(lambda b: np.array([[b.any()]]), chunks=(1, 1), dtype=bool).compute(
                scheduler=LOCAL_SCHEDULER
            )
        )
    v = np.asarray(valid, dtype=bool)
    ny, nx = v.shape
    return np.array(
        [
            [v[y : y + tile, x : x + tile].any() for x in range(0, nx, tile)]
            for y in range(0, ny, tile)
        ]
    )


#: what to do when a tile store's chunk fails its checksum
_REBUILD = (
    "delete the tile store (its records folder too) and rerun the same command: it is rebuilt "
    "from the ingested scene, and tiles of a model stage are recomputed."
)


def read_valid(path: str | Path, window: Any) -> np.ndarray:
    arr = zarr.open_array(str(Path(path) / VALID), mode="r")
    return read_checked(arr, window.slices, store=path, array=VALID, fix=_REBUILD)


def read_tile(path: str | Path, grid: TileGrid, tile: Tile) -> np.ndarray:
    """The ``(channels, h, w)`` data of one tile (one chunk read, checksum verified), padding dropped.

    A chunk whose crc32c does not match raises :class:`pipeline.chunk_checksums.ChunkChecksumError`.
    """
    arr = zarr.open_array(str(Path(path) / DATA), mode="r")
    h, w = tile.read.shape
    return read_checked(arr, grid.position(tile), store=path, array=DATA, fix=_REBUILD)[:, :h, :w]


# ---------------------------------------------------------------------------- output tiles
def records_dir(stage_path: str | Path) -> Path:
    p = Path(stage_path)
    return p.with_name(p.name.removesuffix(".zarr") + ".records")


def create_output_store(
    path: str | Path,
    grid: TileGrid,
    channels: list[str],
    *,
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Create (or reopen, for resume) a model stage's tile-output store."""
    path = Path(path)
    records_dir(path).mkdir(parents=True, exist_ok=True)
    if path.exists():
        a = store_attrs(path)
        if a.get("channels") != list(channels) or a.get("grid") != grid_to_attrs(grid):
            raise WriteError(
                f"tile-output store {str(path)!r} exists with other channels or grid; "
                "remove it (or use a new run directory)"
            )
        return path
    _create_tile_array(
        path, grid, len(channels), {"channels": list(channels), **(attrs or {})}, False
    )
    return path


def write_tile_output(path: str | Path, grid: TileGrid, tile: Tile, out: np.ndarray) -> str:
    """Write one tile's model output (its own chunk, so no two writers share a chunk); returns its sha256."""
    arr = zarr.open_array(str(Path(path) / DATA), mode="r+")
    c = arr.shape[1]
    if out.ndim != 3 or out.shape[0] != c or tuple(out.shape[1:]) != tile.read.shape:
        raise WriteError(
            f"tile {tile.key!r}: model output has shape {tuple(out.shape)!r}, expected "
            f"{(c, *tile.read.shape)!r}; the model must keep the spatial size and give {c} channels"
        )
    arr[grid.position(tile)] = _pad(out, arr.shape[2:])
    return tile_checksum(out)


def write_record(path: str | Path, record: TileRecord) -> None:
    """Write a tile record atomically (temp file + rename): the tile's commit marker."""
    d = records_dir(path)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{record.key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record.to_json(), sort_keys=True, default=str))
    os.replace(tmp, d / f"{record.key}.json")


def load_records(path: str | Path) -> dict[str, TileRecord]:
    """All tile records of a stage, by tile key (unreadable records are ignored: recomputed)."""
    out: dict[str, TileRecord] = {}
    d = records_dir(path)
    if not d.is_dir():
        return out
    for f in sorted(d.glob("*.json")):
        try:
            rec = TileRecord.from_json(json.loads(f.read_text()))
            out[rec.key] = rec
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            continue
    return out


def verify_tile(path: str | Path, grid: TileGrid, tile: Tile, checksum: str | None) -> bool:
    """True when the stored tile output reads back and hashes to ``checksum``."""
    if not checksum:
        return False
    try:
        data = read_tile(path, grid, tile)
    except Exception:
        return False
    return tile_checksum(data) == checksum
