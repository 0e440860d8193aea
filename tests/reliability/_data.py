"""Real test inputs for the reliability suite: crops of the shipped EnMAP Potsdam demo scene.

Every file is cut at test time from ``tests/data`` (real EnMAP L2A, see ``tests/data/ATTRIBUTION.md``)
into a temporary folder; bad inputs are corrupt copies of these crops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[2]
TEST_DATA = ROOT / "tests" / "data"
DEMO = TEST_DATA / "demo" / "enmap_potsdam_mosaic_18tiles.tif"
TILE = TEST_DATA / "enmap_potsdam_tile" / "enmap_potsdam_tile_128_0.tif"
BERLIN = TEST_DATA / "enmap_berlin_tiny" / "enmap.tif"
GAMSBERG = TEST_DATA / "engeomap_gamsberg" / "cubus_gamsberg_subset"
PAVIA = TEST_DATA / "pavia_u_sub" / "paviaU_subimg.mat"

#: a fully valid 64x64 block of the demo mosaic (rows 96..160, cols 64..128)
FULL_BLOCK = (96, 64)


def crop_geotiff(
    dest: Path,
    *,
    src: Path = DEMO,
    row: int = FULL_BLOCK[0],
    col: int = FULL_BLOCK[1],
    size: int | tuple[int, int] = 64,
    bands: slice | None = slice(20, 60),
) -> Path:
    """Write a spatial (and spectral) crop of ``src`` as a tiled GeoTIFF with its band tags and CRS.

    Spectral crops keep real contiguous bands (default: 40 VNIR bands) so that models stay cheap.
    """
    h, w = (size, size) if isinstance(size, int) else size
    with rasterio.open(src) as s:
        idx = list(range(1, s.count + 1))
        if bands is not None:
            idx = idx[bands]
        win = Window(col, row, w, h)
        data = s.read(idx, window=win)
        profile = s.profile | {
            "width": w,
            "height": h,
            "count": len(idx),
            "transform": s.window_transform(win),
            "tiled": True,
            "blockxsize": 16,
            "blockysize": 16,
            "compress": "deflate",
            "interleave": "band",
        }
        band_tags = [s.tags(i) for i in idx]
        tags = s.tags()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(dest, "w", **profile) as d:
        d.write(data)
        d.update_tags(**tags)
        for j, t in enumerate(band_tags, 1):
            d.update_tags(j, **t)
    return dest


def read_cube(path: Path) -> tuple[np.ndarray, dict]:
    """The raw cube and profile of a GeoTIFF."""
    with rasterio.open(path) as s:
        return s.read(), dict(s.profile)
