"""Benchmark inputs built from the real demo mosaic (EnMAP Potsdam, 192×160×224).

Crops are written as GeoTIFFs with the source's band tags (wavelength, fwhm, bbl), so the
pipeline reads them exactly like the demo scene. Larger scenes (4×, 16× the area) are built by
mirroring the mosaic (numpy flips, block by block) so that their content stays real and their
edges continuous; nothing is synthesised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "tests" / "data" / "demo" / "enmap_potsdam_mosaic_18tiles.tif"
#: fully valid windows of the demo mosaic (y0, x0, h, w); the mosaic is 40 % nodata elsewhere
VALID_WINDOWS = ((0, 0, 64, 96), (96, 32, 64, 128), (96, 96, 96, 64))


@dataclass(frozen=True)
class Crop:
    """A window of the demo scene: rows ``y0:y0+h``, columns ``x0:x0+w``, the first ``bands`` bands."""

    y0: int
    x0: int
    h: int
    w: int
    bands: int | None = None

    def __post_init__(self) -> None:
        if min(self.h, self.w) < 2 or self.y0 < 0 or self.x0 < 0:
            raise ConfigError(f"crop {self!r} must be at least 2×2 pixels at a non-negative offset")
        if self.y0 + self.h > 192 or self.x0 + self.w > 160:
            raise ConfigError(f"crop {self!r} leaves the 192×160 demo scene; shrink it")

    @property
    def label(self) -> str:
        b = "all bands" if self.bands is None else f"first {self.bands} bands"
        return f"demo[{self.y0}:{self.y0 + self.h}, {self.x0}:{self.x0 + self.w}], {b}"


#: optional export of the demo scene (``python -m benchmarks.data export FILE.npz``): a GPU machine
#: without GDAL/rasterio reads the same cube from it (set this environment variable to its path)
CUBE_ENV = "HYPERDEQ_BENCH_CUBE"


def export_cube(dest: str | Path) -> Path:
    """Write the whole demo scene (all bands, NaN nodata), good-band flags and wavelengths to ``dest`` (npz)."""
    from pipeline.readers import open_scene

    s = open_scene(demo_path())
    dest = Path(dest)
    np.savez_compressed(
        dest,
        cube=np.asarray(s.values, dtype=np.float32),
        good_band=np.asarray(s["good_band"].values, dtype=bool),
        wavelength=np.asarray(s["wavelength"].values, dtype=np.float64),
    )
    return dest


def _exported() -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    import os

    p = os.environ.get(CUBE_ENV)
    if not p:
        return None
    if not Path(p).is_file():
        raise ConfigError(
            f"{CUBE_ENV}={p!r} is not a file; write it with `python -m benchmarks.data export {p}`"
        )
    with np.load(p) as d:
        return d["cube"], d["good_band"], d["wavelength"]


def demo_path() -> Path:
    if not DEMO.is_file():
        raise ConfigError(
            f"demo scene {str(DEMO)!r} is missing; the benchmarks need the shipped tests/data"
        )
    return DEMO


def read_cube(crop: Crop | None = None, good_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The demo scene (or a crop) as a float32 ``(B, H, W)`` array with NaN nodata, and its wavelengths.

    ``good_only`` keeps the good bands (what the models see).
    """
    ex = _exported()
    if ex is not None:
        cube, good, wl = ex
        if crop is not None:
            nb = crop.bands or cube.shape[0]
            cube = cube[:nb, crop.y0 : crop.y0 + crop.h, crop.x0 : crop.x0 + crop.w]
            good, wl = good[:nb], wl[:nb]
        if good_only:
            cube, wl = cube[good], wl[good]
        return np.ascontiguousarray(cube, dtype=np.float32), np.asarray(wl, dtype=np.float64)
    from pipeline.readers import open_scene

    s = open_scene(demo_path())
    if crop is not None:
        s = s.isel(y=slice(crop.y0, crop.y0 + crop.h), x=slice(crop.x0, crop.x0 + crop.w))
        if crop.bands is not None:
            s = s.isel(band=slice(0, crop.bands))
    if good_only:
        s = s.isel(band=np.flatnonzero(np.asarray(s["good_band"].values, dtype=bool)))
    return np.asarray(s.values, dtype=np.float32), np.asarray(
        s["wavelength"].values, dtype=np.float64
    )


def _profile_and_tags(n_bands: int) -> tuple[dict, dict, list[dict], list[str | None]]:
    import rasterio

    with rasterio.open(demo_path()) as src:
        prof = dict(src.profile)
        tags = src.tags()
        band_tags = [src.tags(i + 1) for i in range(n_bands)]
        desc = list(src.descriptions[:n_bands])
    return prof, tags, band_tags, desc


def write_crop(dest: str | Path, crop: Crop) -> Path:
    """Write ``crop`` of the demo scene as a GeoTIFF with the demo's georeferencing and band tags."""
    import rasterio
    from rasterio.windows import Window

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(demo_path()) as src:
        nb = crop.bands or src.count
        win = Window(crop.x0, crop.y0, crop.w, crop.h)
        data = src.read(indexes=list(range(1, nb + 1)), window=win)
        transform = src.window_transform(win)
    prof, tags, band_tags, desc = _profile_and_tags(nb)
    prof.update(
        count=nb,
        height=crop.h,
        width=crop.w,
        transform=transform,
        tiled=True,
        blockxsize=16,
        blockysize=16,
        compress=None,
        interleave="pixel",
    )
    with rasterio.open(dest, "w", **prof) as dst:
        dst.write(data)
        dst.update_tags(**tags)
        for i in range(nb):
            dst.update_tags(i + 1, **band_tags[i])
            if desc[i]:
                dst.set_band_description(i + 1, desc[i])
    return dest


def write_mirrored(dest: str | Path, factor: int, base: Crop | None = None) -> Path:
    """A scene of ``factor`` × the area of ``base`` (default: the whole demo) made of mirrored copies.

    ``factor`` must be a square (1, 4, 16, ...): a k×k mosaic of the base, blocks flipped along y
    on odd rows and along x on odd columns (continuous edges). Written block by block, so this
    process never holds the big scene.
    """
    import rasterio
    from rasterio.windows import Window

    k = int(round(math.sqrt(factor)))
    if k * k != factor or k < 1:
        raise ConfigError(f"area factor must be a square number (1, 4, 16, ...), got {factor!r}")
    base = base or Crop(0, 0, 192, 160)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(demo_path()) as src:
        nb = base.bands or src.count
        win = Window(base.x0, base.y0, base.w, base.h)
        block = src.read(indexes=list(range(1, nb + 1)), window=win)
        transform = src.window_transform(win)
    prof, tags, band_tags, desc = _profile_and_tags(nb)
    h, w = base.h, base.w
    bs = 32 if min(h, w) >= 32 else 16
    prof.update(
        count=nb,
        height=h * k,
        width=w * k,
        transform=transform,
        tiled=True,
        blockxsize=bs,
        blockysize=bs,
        compress=None,
        interleave="pixel",
        BIGTIFF="IF_SAFER",
    )
    with rasterio.open(dest, "w", **prof) as dst:
        for i in range(k):
            for j in range(k):
                b = block
                if i % 2:
                    b = b[:, ::-1, :]
                if j % 2:
                    b = b[:, :, ::-1]
                dst.write(np.ascontiguousarray(b), window=Window(j * w, i * h, w, h))
        dst.update_tags(**tags, HYPERDEQ_BENCH=f"{k}x{k} mirrored mosaic of {base.label}")
        for i in range(nb):
            dst.update_tags(i + 1, **band_tags[i])
            if desc[i]:
                dst.set_band_description(i + 1, desc[i])
    return dest


if __name__ == "__main__":  # python -m benchmarks.data export FILE.npz
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "export":
        raise SystemExit("usage: python -m benchmarks.data export FILE.npz")
    print(export_cube(sys.argv[2]))
