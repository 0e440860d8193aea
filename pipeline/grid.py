"""The tile grid: pure geometry, no I/O.

A :class:`Tile` is a frozen value: its grid index, its *core* window (the pixels it is responsible
for) and its halo. The *read* window (core grown by the halo, clipped to the scene) and where the
core sits inside it are derived. :func:`plan_grid` cuts a scene shape into tiles whose cores
partition the scene exactly; edge tiles are smaller, never shifted, so that no pixel has two owners.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipeline.errors import GridError


@dataclass(frozen=True, order=True)
class Window:
    """A half-open pixel rectangle ``[y0, y1) x [x0, x1)``."""

    y0: int
    y1: int
    x0: int
    x1: int

    def __post_init__(self) -> None:
        if self.y1 < self.y0 or self.x1 < self.x0:
            raise GridError(
                f"window {self!r} has a negative size; y1 >= y0 and x1 >= x0 are required"
            )

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def slices(self) -> tuple[slice, slice]:
        return (slice(self.y0, self.y1), slice(self.x0, self.x1))

    def intersect(self, other: Window) -> Window | None:
        """The overlap of two windows, or None when they do not overlap."""
        y0, y1 = max(self.y0, other.y0), min(self.y1, other.y1)
        x0, x1 = max(self.x0, other.x0), min(self.x1, other.x1)
        if y1 <= y0 or x1 <= x0:
            return None
        return Window(y0, y1, x0, x1)

    def relative_to(self, outer: Window) -> Window:
        """This window in the coordinates of ``outer`` (which must contain it)."""
        return Window(
            self.y0 - outer.y0, self.y1 - outer.y0, self.x0 - outer.x0, self.x1 - outer.x0
        )


@dataclass(frozen=True, order=True)
class Tile:
    """One tile: grid ``index`` (row, col), ``core`` window, ``halo`` and the scene ``shape`` (y, x)."""

    index: tuple[int, int]
    core: Window
    halo: int
    scene_shape: tuple[int, int]

    @property
    def key(self) -> str:
        """A stable name, used for records and file names."""
        return f"r{self.index[0]:05d}_c{self.index[1]:05d}"

    @property
    def read(self) -> Window:
        """Core grown by the halo on every side, clipped to the scene."""
        h = self.halo
        ny, nx = self.scene_shape
        return Window(
            max(0, self.core.y0 - h),
            min(ny, self.core.y1 + h),
            max(0, self.core.x0 - h),
            min(nx, self.core.x1 + h),
        )

    @property
    def core_in_read(self) -> Window:
        """Where the core sits inside the read window."""
        return self.core.relative_to(self.read)


@dataclass(frozen=True)
class TileGrid:
    """A planned grid: the tiles to run and the tiles skipped because their core holds no valid pixel."""

    shape: tuple[int, int]
    tile: int
    halo: int
    tiles: tuple[Tile, ...]
    skipped: tuple[Tile, ...] = ()

    @property
    def n_rows(self) -> int:
        return -(-self.shape[0] // self.tile)

    @property
    def n_cols(self) -> int:
        return -(-self.shape[1] // self.tile)

    @property
    def all_tiles(self) -> tuple[Tile, ...]:
        """Every tile of the grid (run and skipped), in index order."""
        return tuple(sorted(self.tiles + self.skipped))

    @property
    def max_read_shape(self) -> tuple[int, int]:
        """The largest read window (all tile stores are chunked to it)."""
        return (
            min(self.shape[0], self.tile + 2 * self.halo),
            min(self.shape[1], self.tile + 2 * self.halo),
        )

    def position(self, tile: Tile) -> int:
        """Flat position of a tile (row-major over the full grid): its slot in the tile stores."""
        return tile.index[0] * self.n_cols + tile.index[1]

    @cached_property
    def _by_index(self) -> dict[tuple[int, int], Tile]:
        return {t.index: t for t in self.tiles}

    def overlapping(self, window: Window) -> Iterator[Tile]:
        """Run tiles whose read window overlaps ``window``, in index order (index arithmetic, no scan)."""
        h, n = self.halo, self.tile
        r0, r1 = max(0, (window.y0 - h) // n), min(self.n_rows - 1, (window.y1 - 1 + h) // n)
        c0, c1 = max(0, (window.x0 - h) // n), min(self.n_cols - 1, (window.x1 - 1 + h) // n)
        for r in range(r0, r1 + 1):
            for c in range(c0, c1 + 1):
                t = self._by_index.get((r, c))
                if t is not None and t.read.intersect(window) is not None:
                    yield t

    def to_dict(self) -> dict[str, object]:
        return {
            "shape": list(self.shape),
            "tile": self.tile,
            "halo": self.halo,
            "n_tiles": len(self.tiles),
            "skipped": [t.key for t in self.skipped],
        }


def _check_geometry(shape: tuple[int, ...], tile: int, halo: int) -> tuple[int, int]:
    if len(shape) != 2:
        raise GridError(f"plan_grid needs a 2-D (y, x) shape, got {shape!r}")
    ny, nx = (int(s) for s in shape)
    if ny <= 0 or nx <= 0:
        raise GridError(f"scene shape must be positive, got {shape!r}; the scene holds no pixels")
    if tile <= 0:
        raise GridError(f"tile size must be > 0, got {tile!r}; pass e.g. tile=128")
    if halo < 0:
        raise GridError(f"halo must be >= 0, got {halo!r}")
    if halo >= tile:
        raise GridError(
            f"halo {halo!r} must be smaller than the tile {tile!r}; raise the tile size or lower the halo"
        )
    return ny, nx


def plan_grid(
    shape: tuple[int, int],
    tile: int,
    halo: int,
    valid: np.ndarray | None = None,
    *,
    tile_valid: np.ndarray | None = None,
) -> TileGrid:
    """Plan tiles over a ``(y, x)`` shape, skipping cores without a valid pixel.

    ``valid``: the full-resolution validity mask; or ``tile_valid``: one bool per tile
    (``n_rows x n_cols``, "the core holds a valid pixel"), which big scenes compute chunk-wise.
    """
    ny, nx = _check_geometry(tuple(shape), int(tile), int(halo))
    if tile_valid is not None:
        tile_valid = np.asarray(tile_valid, dtype=bool)
        want = (-(-ny // tile), -(-nx // tile))
        if tile_valid.shape != want:
            raise GridError(
                f"per-tile validity has shape {tile_valid.shape!r}, expected {want!r} tiles"
            )
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != (ny, nx):
            raise GridError(
                f"validity mask shape {valid.shape!r} does not match the scene shape {(ny, nx)!r}"
            )
    run: list[Tile] = []
    skipped: list[Tile] = []
    for r, y0 in enumerate(range(0, ny, tile)):
        for c, x0 in enumerate(range(0, nx, tile)):
            t = Tile(
                (r, c), Window(y0, min(y0 + tile, ny), x0, min(x0 + tile, nx)), int(halo), (ny, nx)
            )
            if (valid is not None and not valid[t.core.slices].any()) or (
                tile_valid is not None and not tile_valid[r, c]
            ):
                skipped.append(t)
            else:
                run.append(t)
    return TileGrid((ny, nx), int(tile), int(halo), tuple(run), tuple(skipped))


def axis_weight(
    lo: int, hi: int, core_lo: int, core_hi: int, n: int, halo: int, window: str
) -> np.ndarray:
    """1-D blend weight over the read interval ``[lo, hi)`` of a tile along one axis.

    ``hann``: 1 inside the core away from neighbours, a raised-cosine ramp across each overlap
    ``[core_edge - halo, core_edge + halo)`` shared with a neighbour (the neighbour's ramp is the
    mirror, so the two sum to one); no ramp at the scene edge. Strictly positive on ``[lo, hi)``.
    ``uniform``: 1 everywhere. ``crop``: 1 on the core, 0 elsewhere.
    """
    p = np.arange(lo, hi, dtype=np.float64)
    if window == "uniform":
        return np.ones_like(p)
    if window == "crop":
        return ((p >= core_lo) & (p < core_hi)).astype(np.float64)
    w = np.ones_like(p)
    if halo > 0:
        ramp = 4.0 * halo
        if core_lo > 0:  # neighbour below: ramp up across [core_lo - halo, core_lo + halo)
            m = p < core_lo + halo
            w[m] *= np.sin(np.pi * (p[m] - (core_lo - halo) + 0.5) / ramp) ** 2
        if core_hi < n:  # neighbour above: ramp down across [core_hi - halo, core_hi + halo)
            m = p >= core_hi - halo
            w[m] *= np.cos(np.pi * (p[m] - (core_hi - halo) + 0.5) / ramp) ** 2
    return w


def tile_weight(tile: Tile, window: str) -> np.ndarray:
    """2-D blend weight over the read window of ``tile`` (float64)."""
    r, c = tile.read, tile.core
    ny, nx = tile.scene_shape
    wy = axis_weight(r.y0, r.y1, c.y0, c.y1, ny, tile.halo, window)
    wx = axis_weight(r.x0, r.x1, c.x0, c.x1, nx, tile.halo, window)
    return np.outer(wy, wx)
