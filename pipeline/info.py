"""One-screen summary of a scene: shape, bands, wavelengths, CRS, resolution, nodata, size.

Works on any readable input (via :func:`pipeline.readers.open_scene`) and on hyperdeq zarr stores,
whose nodata fraction is taken from the statistics recorded at ingest (no data read). For other
inputs the nodata fraction is computed window by window (bounded memory).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.readers import detect_format, is_hyperdeq_zarr, open_scene
from pipeline.scene import MissingCRSWarning, nodata_fraction


@dataclass(frozen=True)
class SceneInfo:
    """What ``hyperdeq info`` prints (JSON-able via :meth:`as_dict`)."""

    path: str
    format: str
    shape: tuple[int, int, int]  # (band, y, x)
    wavelength_min_nm: float | None
    wavelength_max_nm: float | None
    crs: str | None
    resolution: tuple[float, float] | None  # (x, y) map units per pixel
    nodata_fraction: float
    bad_bands: list[int] = field(default_factory=list)
    bytes_on_disk: int = 0
    bytes_in_memory: int = 0
    scale_factor: float = 1.0
    complete: bool | None = None  # zarr stores only

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _disk_size(p: Path) -> int:
    if p.is_dir():
        return sum(q.stat().st_size for q in p.rglob("*") if q.is_file())
    sides = {Path(str(p) + ".hdr"), p.with_suffix(".hdr"), Path(str(p) + ".aux.xml")} - {p}
    return p.stat().st_size + sum(s.stat().st_size for s in sides if s.is_file())


def scene_info(path: str | Path, format: str | None = None, **options: Any) -> SceneInfo:
    """Summarise the scene at ``path`` (reads data only to count nodata when not recorded)."""
    p = Path(path).expanduser()
    fmt = format or detect_format(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingCRSWarning)
        da = open_scene(p, format=format, **options)
    complete = None
    frac = None
    if fmt == "zarr" and is_hyperdeq_zarr(p):
        from pipeline.ingest import store_metadata

        meta = store_metadata(p)
        complete = bool(meta.get("complete"))
        frac = meta.get("nodata_fraction")
    if frac is None:
        frac = nodata_fraction(da)
    wl = np.asarray(da["wavelength"].values, dtype=float)
    known = wl[np.isfinite(wl)]
    crs = da.rio.crs
    res = None
    if not da.attrs.get("crs_missing", True) or "spatial_ref" in da.coords:
        try:
            rx, ry = da.rio.resolution()
            res = (abs(float(rx)), abs(float(ry)))
        except Exception:
            res = None
    return SceneInfo(
        path=str(p),
        format=fmt,
        shape=tuple(int(s) for s in da.shape),  # type: ignore[arg-type]
        wavelength_min_nm=float(known.min()) if known.size else None,
        wavelength_max_nm=float(known.max()) if known.size else None,
        crs=crs.to_string() if crs is not None else None,
        resolution=res,
        nodata_fraction=float(frac),
        bad_bands=[int(i) for i in np.flatnonzero(~np.asarray(da["good_band"].values, bool))],
        bytes_on_disk=_disk_size(p),
        bytes_in_memory=int(np.prod(da.shape)) * 4,
        scale_factor=float(da.attrs.get("source_scale_factor", 1.0)),
        complete=complete,
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} TiB"


def format_info(info: SceneInfo) -> str:
    """Human-readable multi-line summary."""
    nb, ny, nx = info.shape
    wl = (
        f"{info.wavelength_min_nm:.1f}–{info.wavelength_max_nm:.1f} nm"
        if info.wavelength_min_nm is not None
        else "unknown"
    )
    res = (
        f"{info.resolution[0]:g} × {info.resolution[1]:g} (map units/pixel)"
        if info.resolution
        else "n/a (no georeferencing)"
    )
    bad = f"{len(info.bad_bands)} {info.bad_bands}" if info.bad_bands else "0"
    lines = [
        f"scene:      {info.path}",
        f"format:     {info.format}"
        + ("" if info.complete is None else f" (complete: {info.complete})"),
        f"shape:      {nb} bands × {ny} rows × {nx} cols",
        f"bands:      {nb}, wavelengths {wl}",
        f"CRS:        {info.crs or 'none (outputs cannot be georeferenced)'}",
        f"resolution: {res}",
        f"nodata:     {100.0 * info.nodata_fraction:.1f} % of pixels",
        f"bad bands:  {bad}",
        f"scale:      raw / {info.scale_factor:g}",
        f"size:       {_human(info.bytes_on_disk)} on disk, {_human(info.bytes_in_memory)} as float32",
    ]
    return "\n".join(lines)
