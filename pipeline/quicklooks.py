"""Quicklook PNGs: the one place that draws them (numpy + Pillow + zarr).

Used by the run's write stage (``quicklook_rgb.png``, ``quicklook_abundances.png``,
``quicklook_spectra.png`` in the run folder: :func:`quicklook_rgb`, :func:`quicklook_abundances`,
:func:`quicklook_spectra`) and by the Prefect artifacts (``flows/artifacts.py``: :func:`rgb_png`,
:func:`abundance_png`, :func:`spectra_png`, :func:`data_uri`). Every image is at least
:data:`QUICKLOOK_MIN_SIDE` px on its longer side (a small scene is enlarged by an integer factor,
nearest neighbour, so scene pixels stay visible as squares) and says what it shows:

* **RGB**: three bands (nearest to :data:`RGB_NM` among good bands), each 2–98 % stretched, under a
  title naming the bands (``R 641 nm G 550 nm B 460 nm``); nodata is transparent;
* **abundances**: one panel per endmember on one fixed 0–1 colour ramp, titled with the
  endmember's name, and a colour bar with ticks; nodata is transparent (white on a flat background);
* **spectra**: the endmember spectra against wavelength, with axes and a legend.

The ``quicklook_*`` writers read zarr arrays with a stride (at most ``max_side`` pixels per side),
so memory stays bounded whatever the scene size.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from PIL import Image, ImageDraw, ImageFont

#: true-colour band centres (nm), EnMAP/AVIRIS-like
RGB_NM: tuple[float, float, float] = (640.0, 550.0, 460.0)
#: longest side of the artifacts' RGB quicklooks (the run folder's may be larger: ``max_side``)
QUICKLOOK_MAX_SIDE = 384
#: quicklooks are at least this many pixels on their longer side
QUICKLOOK_MIN_SIDE = 256
#: height of the title strip above every quicklook panel (pixels, one line of text)
HEADER_PX = 22
_WHITE = (255, 255, 255)
_INK = (30, 30, 30)
#: distinct line colours for endmember spectra (chosen by hand; colour-blind-friendly order)
LINE_COLOURS = [
    (0, 114, 178),
    (230, 159, 0),
    (0, 158, 115),
    (204, 121, 167),
    (86, 180, 233),
    (213, 94, 0),
    (240, 228, 66),
    (0, 0, 0),
    (120, 120, 120),
    (150, 75, 0),
]
#: a perceptually ordered ramp (dark blue -> teal -> yellow), anchors only; no copied colormap
_RAMP = np.array(
    [
        [0.10, 0.05, 0.30],
        [0.15, 0.40, 0.55],
        [0.20, 0.65, 0.50],
        [0.70, 0.80, 0.25],
        [0.99, 0.90, 0.15],
    ],
    dtype=np.float32,
)


# ---------------------------------------------------------------------------- helpers
def _font(size: int = 13) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _stretch(x: np.ndarray, lo_pct: float = 2.0, hi_pct: float = 98.0) -> np.ndarray:
    """Percentile stretch to [0, 1] ignoring NaN; constant or empty input gives zeros."""
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.zeros_like(x, dtype=np.float32)
    lo, hi = np.percentile(finite, [lo_pct, hi_pct])
    if not hi > lo:
        return np.zeros_like(x, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _step(shape: Sequence[int], max_side: int) -> int:
    """The stride that brings the last two axes of ``shape`` to at most ``max_side``."""
    return max(1, int(np.ceil(max(shape[-2:]) / max(max_side, 1))))


def _downsample(arr: np.ndarray, max_side: int) -> np.ndarray:
    """Stride-subsample the last two axes so that neither exceeds ``max_side``."""
    s = _step(arr.shape, max_side)
    return arr[..., ::s, ::s]


def _enlarge(img: Image.Image, min_side: int) -> Image.Image:
    """``img`` scaled up by the smallest integer factor that makes its longer side >= ``min_side``."""
    k = max(1, int(np.ceil(min_side / max(img.size))))
    return img if k == 1 else img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST)


def _wrap(text: str, width: int, font: Any) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a long word stays whole)."""
    lines: list[str] = []
    for word in text.split(" "):
        cand = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(cand) <= width:
            lines[-1] = cand
        else:
            lines.append(word)
    return lines or [""]


def _titled(img: Image.Image, title: str, mode: str) -> Image.Image:
    """``img`` below an opaque white strip holding ``title``: :data:`HEADER_PX` for one line, 16 px
    more per extra line (wrapped to the width)."""
    f = _font(13)
    lines = _wrap(title, img.width - 8, f)
    head = HEADER_PX + (len(lines) - 1) * 16
    out = Image.new(
        mode, (img.width, img.height + head), _WHITE + ((255,) if mode == "RGBA" else ())
    )
    out.paste(img, (0, head))
    d = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        d.text(
            (4, 4 + 16 * i), line.replace("\u00a0", " "), fill=_INK, font=f
        )  # NBSP: no break, a space
    return out


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding a PNG in markdown."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------------------- RGB
def rgb_bands(
    wavelength: Sequence[float] | np.ndarray | None,
    n_bands: int,
    good: Sequence[bool] | np.ndarray | None = None,
) -> tuple[int, int, int]:
    """Band indices closest to :data:`RGB_NM` among good bands with a known wavelength; without
    any, bands at 3/4, 1/2 and 1/4 of the good bands (red from the long-wavelength end)."""
    idx = np.arange(n_bands)
    ok = np.ones(n_bands, bool) if good is None else np.asarray(good, bool)
    wl = np.full(n_bands, np.nan) if wavelength is None else np.asarray(wavelength, float)
    cand = ok & np.isfinite(wl)
    if not cand.any():
        pool = idx[ok] if ok.any() else idx
        n = len(pool)
        return int(pool[(3 * n) // 4]), int(pool[n // 2]), int(pool[n // 4])
    wl = np.where(cand, wl, np.inf)
    r, g, b = (int(np.argmin(np.abs(wl - t))) for t in RGB_NM)
    return r, g, b


def rgb_title(label: str, wavelengths_nm: Sequence[float] | None) -> str:
    """``label · R 640 nm G 550 nm B 460 nm`` (the bands shown); just ``label`` if unknown."""
    if wavelengths_nm is None or not np.all(np.isfinite(np.asarray(wavelengths_nm, float))):
        return label
    r, g, b = (float(w) for w in wavelengths_nm)
    nb = "\u00a0"  # no break inside "R 641 nm" when the title wraps
    return f"{label} · " + " ".join(
        f"{c}{nb}{w:.0f}{nb}nm" for c, w in (("R", r), ("G", g), ("B", b))
    )


def rgb_png(
    cube: np.ndarray,
    bands: Sequence[int],
    max_side: int = QUICKLOOK_MAX_SIDE,
    *,
    title: str | None = None,
    min_side: int = QUICKLOOK_MIN_SIDE,
) -> bytes:
    """PNG bytes (RGBA) of a ``(band, y, x)`` cube shown as RGB from ``bands``; nodata is transparent.

    Decimated to ``max_side``, enlarged to at least ``min(min_side, max_side)`` (integer factor,
    nearest); with ``title``, an opaque white strip of :data:`HEADER_PX` above the image names
    what is shown.
    """
    sub = _downsample(np.asarray(cube[list(bands)], dtype=np.float32), max_side)
    valid = np.isfinite(sub).all(axis=0)
    rgb = np.stack([_stretch(b) for b in sub], axis=-1)
    rgba = np.concatenate([rgb, valid[..., None].astype(np.float32)], axis=-1)
    img = Image.fromarray((np.nan_to_num(rgba) * 255).round().astype(np.uint8), mode="RGBA")
    img = _enlarge(img, min(min_side, max_side))
    return _png(_titled(img, title, "RGBA") if title else img)


# ---------------------------------------------------------------------------- abundances
def _colorize(x: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB along :data:`_RAMP` (NaN -> white: nodata)."""
    pos = np.clip(np.nan_to_num(x, nan=0.0), 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(pos.astype(int), len(_RAMP) - 2)
    f = (pos - i)[..., None]
    out = _RAMP[i] * (1 - f) + _RAMP[i + 1] * f
    out[~np.isfinite(x)] = 1.0
    return out


def _colour_bar(height: int, label: str = "abundance") -> Image.Image:
    """A vertical colour bar of the 0-1 ramp with ticks 0, 0.25, 0.5, 0.75, 1 and a label."""
    bar_w, width = 16, 92
    img = Image.new("RGB", (width, height), _WHITE)
    top, bottom = HEADER_PX + 6, height - 8
    ramp = _colorize(np.linspace(1.0, 0.0, max(bottom - top, 2))[:, None].repeat(bar_w, axis=1))
    img.paste(Image.fromarray((ramp * 255).round().astype(np.uint8), "RGB"), (6, top))
    d = ImageDraw.Draw(img)
    d.rectangle((6, top, 6 + bar_w - 1, bottom - 1), outline=_INK)
    f = _font(11)
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - 1 - round(v * (bottom - top - 1))
        d.line((6 + bar_w, y, 6 + bar_w + 4, y), fill=_INK)
        d.text((6 + bar_w + 7, y - 6), f"{v:g}", fill=_INK, font=f)
    d.text((2, 4), label, fill=_INK, font=f)
    return img


def abundance_png(
    abundance: np.ndarray,
    names: Sequence[str] | None = None,
    max_side: int = 256,
    gap: int = 8,
    *,
    min_side: int = QUICKLOOK_MIN_SIDE,
) -> bytes:
    """PNG bytes (RGBA) of ``P`` abundance maps ``(P, y, x)`` side by side on one fixed 0-1 ramp.

    Each panel (at least ``min(min_side, max_side)`` px on its longer side) is titled with its
    endmember's name (``names``, else ``endmember k``); a colour bar with ticks closes the strip.
    Nodata pixels are transparent (white once flattened); titles, gaps and bar are opaque.
    """
    ab = _downsample(np.asarray(abundance, dtype=np.float32), max_side)
    p = ab.shape[0]
    labels = (
        [str(n) for n in names] if names is not None else [f"endmember {k + 1}" for k in range(p)]
    )
    panels = []
    for k in range(p):
        rgba = np.concatenate(
            [_colorize(ab[k]), np.isfinite(ab[k])[..., None].astype(np.float32)], axis=-1
        )
        img = Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA")
        panels.append(_enlarge(img, min(min_side, max_side)))
    # one title height for all panels (the longest label decides), so the maps line up
    titled = [_titled(q, labels[k], "RGBA") for k, q in enumerate(panels)]
    head = max(t.height for t in titled) - panels[0].height
    bar = _colour_bar(panels[0].height + head)
    w = sum(q.width for q in panels) + gap * p + bar.width
    canvas = Image.new("RGBA", (w, panels[0].height + head), _WHITE + (255,))
    x = 0
    for t in titled:
        canvas.paste(t, (x, head - (t.height - panels[0].height)))
        x += t.width + gap
    canvas.paste(bar, (x, 0))
    return _png(canvas)


# ---------------------------------------------------------------------------- spectra
def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    span = max(hi - lo, 1e-12)
    raw = span / max(n - 1, 1)
    mag = 10 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = np.ceil(lo / step) * step
    return [float(v) for v in np.arange(start, hi + step * 0.001, step)]


def spectra_png(
    wavelength_nm: Sequence[float | None],
    spectra: Mapping[str, Sequence[float]],
    width: int = 720,
    height: int = 400,
    *,
    title: str = "endmember spectra",
) -> bytes:
    """PNG bytes of a line plot of endmember spectra against wavelength (nm), with axes and a legend.

    Lines break over gaps in the wavelengths (bad bands left out of the fit, e.g. the water
    absorption bands) and over NaN values, so no line is drawn where there is no data.
    """
    wl = np.array([np.nan if w is None else float(w) for w in wavelength_nm], dtype=float)
    if not np.isfinite(wl).any():
        wl = np.arange(len(wl), dtype=float)
        xlabel = "band"
    else:
        xlabel = "wavelength (nm)"
    ys = {str(k): np.asarray(v, dtype=float) for k, v in spectra.items()}
    finite = np.concatenate([y[np.isfinite(y)] for y in ys.values()] or [np.zeros(1)])
    ylo, yhi = 0.0, float(max(finite.max() if finite.size else 1.0, 1e-6)) * 1.05
    xlo, xhi = float(np.nanmin(wl)), float(np.nanmax(wl))
    if not xhi > xlo:
        xhi = xlo + 1.0
    img = Image.new("RGB", (width, height), _WHITE)
    d = ImageDraw.Draw(img)
    f, fs = _font(13), _font(11)
    left, right, top, bottom = 64, width - 150, HEADER_PX + 8, height - 48

    def px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - xlo) / (xhi - xlo) * (right - left),
            bottom - (y - ylo) / (yhi - ylo) * (bottom - top),
        )

    d.text((4, 4), title, fill=_INK, font=f)
    d.rectangle((left, top, right, bottom), outline=_INK)
    for t in _ticks(xlo, xhi, 6):
        x, _ = px(t, ylo)
        d.line((x, bottom, x, bottom + 4), fill=_INK)
        d.text((x - 14, bottom + 6), f"{t:g}", fill=_INK, font=fs)
    for t in _ticks(ylo, yhi, 5):
        _, y = px(xlo, t)
        d.line((left - 4, y, left, y), fill=_INK)
        d.line((left + 1, y, right - 1, y), fill=(230, 230, 230))
        d.text((6, y - 7), f"{t:g}", fill=_INK, font=fs)
    d.text(((left + right) // 2 - 50, bottom + 24), xlabel, fill=_INK, font=f)
    d.text((left + 4, top + 2), "reflectance", fill=_INK, font=fs)
    steps = np.diff(wl[np.isfinite(wl)])
    gap = 3.0 * float(np.median(steps)) if steps.size else np.inf
    for k, (name, vals) in enumerate(ys.items()):
        colour = LINE_COLOURS[k % len(LINE_COLOURS)]
        seg: list[tuple[float, float]] = []
        prev = None
        for xv, yv in zip(wl, vals, strict=False):
            if not (np.isfinite(xv) and np.isfinite(yv)) or (prev is not None and xv - prev > gap):
                if len(seg) > 1:
                    d.line(seg, fill=colour, width=2)
                seg = []
            if np.isfinite(xv) and np.isfinite(yv):
                seg.append(px(xv, float(np.clip(yv, ylo, yhi))))
                prev = xv
        if len(seg) > 1:
            d.line(seg, fill=colour, width=2)
        ly = top + 6 + 18 * k
        d.line((right + 10, ly + 7, right + 32, ly + 7), fill=colour, width=3)
        d.text((right + 38, ly), name[:16], fill=_INK, font=fs)
    return _png(img)


# ---------------------------------------------------------------------------- files from zarr
def _sibling(src_array: str | Path, name: str) -> np.ndarray | None:
    """The 1-D coordinate array ``name`` stored beside ``src_array`` (xarray's layout), or None."""
    try:
        return np.asarray(zarr.open_array(str(Path(src_array).parent / name), mode="r")[...])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def _strided(arr: Any, channels: Sequence[int], max_side: int) -> np.ndarray:
    """``arr[channels]`` of a ``(C, y, x)`` zarr array, read one channel at a time with the stride
    that brings each side to at most ``max_side``."""
    s = _step(arr.shape, max_side)
    return np.stack([np.asarray(arr[c, ::s, ::s], dtype=np.float32) for c in channels])


def _write(dest: str | Path, png: bytes) -> Path:
    Path(dest).write_bytes(png)
    return Path(dest)


def quicklook_rgb(
    src_array: str | Path,
    bands: Sequence[int],
    dest: str | Path,
    *,
    label: str | None = None,
    max_side: int = 1024,
    min_side: int = QUICKLOOK_MIN_SIDE,
) -> Path:
    """Write an RGBA PNG of three bands of a ``(band, y, x)`` zarr array (:func:`rgb_png`).

    The title names what is shown (``label``, else the array's ``long_name``, else its name) and
    the bands' wavelengths (the ``wavelength`` coordinate stored beside the array); at most
    ``max_side`` px of the scene per side, at least ``min_side``; nodata transparent.
    """
    arr = zarr.open_array(str(src_array), mode="r")
    wl = _sibling(src_array, "wavelength")
    shown = [float(wl[b]) for b in bands] if wl is not None and len(wl) == arr.shape[0] else None
    name = label or str(arr.attrs.get("long_name") or Path(src_array).name)
    png = rgb_png(
        _strided(arr, bands, max_side),
        (0, 1, 2),
        max_side,
        title=rgb_title(name, shown),
        min_side=min_side,
    )
    return _write(dest, png)


def quicklook_abundances(
    src_array: str | Path,
    dest: str | Path,
    *,
    names: Sequence[str] | None = None,
    max_side: int = 512,
    min_side: int = QUICKLOOK_MIN_SIDE,
) -> Path:
    """Write the abundance maps of a ``(endmember, y, x)`` zarr array as one PNG (:func:`abundance_png`):
    one panel per endmember titled with its name (``names``, else the ``endmember`` coordinate
    stored beside the array), a colour bar; nodata transparent."""
    arr = zarr.open_array(str(src_array), mode="r")
    if names is None:
        stored = _sibling(src_array, "endmember")
        names = (
            [str(n) for n in stored] if stored is not None and len(stored) == arr.shape[0] else None
        )
    png = abundance_png(
        _strided(arr, range(arr.shape[0]), max_side), names, max_side, min_side=min_side
    )
    return _write(dest, png)


def quicklook_spectra(endmembers_json: str | Path, dest: str | Path) -> Path:
    """Write the endmember spectra of an ``endmembers.json`` (``wavelength_nm``, ``endmembers``:
    name -> values) as a PNG line plot (:func:`spectra_png`)."""
    em = json.loads(Path(endmembers_json).read_text())
    return _write(dest, spectra_png(em["wavelength_nm"], em["endmembers"]))
