"""Prefect artifacts that make a run watchable from its flow-run page.

* a **progress** artifact, updated as tile batches finish (:class:`ProgressReporter`, a callable
  with the library's ``progress(done, total, info)`` signature);
* a **markdown run report**: inputs, models, timings, solver statistics, failed tiles, outputs;
* a **table** of per-scene quality indicators, rounded, with units in the column names
  (reconstruction error, denoising residual, converged tiles per stage, nodata, wall time);
* **quicklooks** (PNG, at least 256 px): before/after RGB with the bands named, abundance maps
  labelled with their endmembers and a colour bar, and the endmember spectra against wavelength.
  Prefect 3.8's image artifact only stores a URL (the page shows it as text), and a flow-run page
  cannot reach files on the worker, so the PNGs are embedded as base64 ``data:`` images in the
  markdown report, written next to the outputs, and published as image artifacts only when an
  ``http(s)`` address serving the output root is given.

Rendering helpers are pure (numpy + Pillow) so they are tested without a server.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np

log = logging.getLogger("hyperdeq.flows.artifacts")

# EnMAP/AVIRIS-like true colour (nm)
RGB_NM: tuple[float, float, float] = (640.0, 550.0, 460.0)
QUICKLOOK_MAX_SIDE = 384
_KEY_RE = re.compile(r"[^a-z0-9-]+")


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from free-form parts."""
    key = "-".join(_KEY_RE.sub("-", p.lower()).strip("-") for p in parts if p)
    key = re.sub(r"-{2,}", "-", key).strip("-")
    return key[:200] or "hyperdeq"


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


# ---------------------------------------------------------------------------------- progress
class SceneProgress:
    """One progress artifact per scene, moved forward as stages and tile batches finish.

    ``stages`` lists the stages in order; the library calls ``progress(stage, done, total)``
    from its tile loops (``denoise``, ``blend_denoise``, ``unmix``, ``blend_unmix``) and the flow
    calls :meth:`stage_done` after the others. Overall progress = (finished stages + fraction of
    the current one) / number of stages. Updates are throttled to one per ``min_interval_s``;
    outside a Prefect run it only logs. A monitoring hiccup never fails the run.
    """

    def __init__(self, key: str, scene: str, stages: Sequence[str],
                 logger: logging.Logger | logging.LoggerAdapter | None = None,
                 min_interval_s: float = 1.0) -> None:
        self.key, self.scene, self.stages = key, scene, list(stages)
        self.log = logger or log
        self.min_interval_s = min_interval_s
        self.artifact_id: UUID | None = None
        self.percent = 0.0
        self.done_stages: set[str] = set()
        self._last_t = 0.0
        if _in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(
                0.0, key=key, description=f"{scene}: starting ({len(self.stages)} stages)")

    def _stage_pos(self, stage: str) -> int:
        return self.stages.index(stage) if stage in self.stages else len(self.done_stages)

    def _push(self, percent: float, description: str, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_t < self.min_interval_s:
            return
        self._last_t = now
        self.percent = percent
        if self.artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            try:
                update_progress_artifact(self.artifact_id, percent, description=description)
            except Exception as exc:
                self.log.warning("could not update progress artifact %r: %s", self.key, exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        frac = 1.0 if total <= 0 else done / total
        pct = round(100.0 * (self._stage_pos(stage) + frac) / max(len(self.stages), 1), 1)
        desc = f"{self.scene}: {stage} {done}/{total} tiles"
        self.log.info("%s (scene %.0f %%)", desc, pct)
        self._push(min(pct, 100.0), desc, force=done >= total)

    def stage_done(self, stage: str) -> None:
        self.done_stages.add(stage)
        pct = round(100.0 * (self._stage_pos(stage) + 1) / max(len(self.stages), 1), 1)
        self._push(min(pct, 100.0), f"{self.scene}: {stage} done", force=True)


def scene_progress(scene: str, stages: Sequence[str],
                   logger: logging.Logger | logging.LoggerAdapter | None = None) -> SceneProgress:
    """The progress artifact of one scene run (key ``hyperdeq-<scene>-progress``)."""
    return SceneProgress(artifact_key("hyperdeq", Path(scene).stem, "progress"), scene, stages, logger)


# ---------------------------------------------------------------------------------- images
#: quicklooks are at least this many pixels on their longer side: a small scene is enlarged by
#: an integer factor (nearest neighbour, so pixels stay visible as squares)
QUICKLOOK_MIN_SIDE = 256
#: height of the title strip above every quicklook panel (pixels)
HEADER_PX = 22
_WHITE = (255, 255, 255)
_INK = (30, 30, 30)
# distinct line colours for endmember spectra (chosen by hand; colour-blind-friendly order)
_LINE_COLOURS = [(0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233),
                 (213, 94, 0), (240, 228, 66), (0, 0, 0), (120, 120, 120), (150, 75, 0)]


def _font(size: int = 13) -> Any:
    from PIL import ImageFont

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


def _downsample(arr: np.ndarray, max_side: int) -> np.ndarray:
    """Stride-subsample the last two axes so that neither exceeds ``max_side``."""
    h, w = arr.shape[-2:]
    step = max(1, int(np.ceil(max(h, w) / max_side)))
    return arr[..., ::step, ::step]


def _enlarge(img: Any, min_side: int) -> Any:
    """``img`` scaled up by the smallest integer factor that makes its longer side >= ``min_side``."""
    from PIL import Image

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


def _titled(img: Any, title: str, mode: str) -> Any:
    """``img`` below a white strip holding ``title``: :data:`HEADER_PX` per line, wrapped to the width."""
    from PIL import Image, ImageDraw

    f = _font(13)
    lines = _wrap(title, img.width - 8, f)
    head = HEADER_PX + (len(lines) - 1) * 16
    out = Image.new(mode, (img.width, img.height + head), _WHITE + ((255,) if mode == "RGBA" else ()))
    out.paste(img, (0, head))
    d = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        d.text((4, 4 + 16 * i), line.replace("\u00a0", " "), fill=_INK, font=f)  # NBSP: no break, a space
    return out


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def rgb_bands(wavelength: Sequence[float] | None, n_bands: int,
              good: Sequence[bool] | None = None) -> tuple[int, int, int]:
    """Band indices closest to :data:`RGB_NM` among good bands (thirds of the cube without wavelengths)."""
    idx = np.arange(n_bands)
    ok = np.ones(n_bands, bool) if good is None else np.asarray(good, bool)
    wl = None if wavelength is None else np.asarray(wavelength, float)
    if wl is None or not np.isfinite(wl).all() or not ok.any():
        cand = idx[ok] if ok.any() else idx
        n = len(cand)
        return int(cand[(3 * n) // 4]), int(cand[n // 2]), int(cand[n // 4])
    wl = np.where(ok, wl, np.inf)
    return tuple(int(np.argmin(np.abs(wl - t))) for t in RGB_NM)  # type: ignore[return-value]


def rgb_title(label: str, wavelengths_nm: Sequence[float] | None) -> str:
    """``label · R 640 nm G 550 nm B 460 nm`` (the bands shown)."""
    if wavelengths_nm is None or not np.all(np.isfinite(np.asarray(wavelengths_nm, float))):
        return label
    r, g, b = (float(w) for w in wavelengths_nm)
    nb = "\u00a0"  # no break inside "R 641 nm" when the title wraps
    return f"{label} · " + " ".join(f"{c}{nb}{w:.0f}{nb}nm" for c, w in (("R", r), ("G", g), ("B", b)))


def rgb_png(cube: np.ndarray, bands: tuple[int, int, int], max_side: int = QUICKLOOK_MAX_SIDE, *,
            title: str | None = None, min_side: int = QUICKLOOK_MIN_SIDE) -> bytes:
    """PNG bytes of a ``(band, y, x)`` cube shown as RGB from ``bands``; nodata is transparent.

    Decimated to ``max_side``, enlarged to at least ``min(min_side, max_side)`` (integer factor,
    nearest); with
    ``title``, a white strip of :data:`HEADER_PX` above the image names what is shown.
    """
    from PIL import Image

    sub = _downsample(np.asarray(cube[list(bands)], dtype=np.float32), max_side)
    valid = np.isfinite(sub).all(axis=0)
    rgb = np.stack([_stretch(b) for b in sub], axis=-1)
    rgba = np.concatenate([rgb, valid[..., None].astype(np.float32)], axis=-1)
    img = Image.fromarray((np.nan_to_num(rgba) * 255).round().astype(np.uint8), mode="RGBA")
    img = _enlarge(img, min(min_side, max_side))
    return _png(_titled(img, title, "RGBA") if title else img)


# a perceptually ordered ramp (dark blue -> teal -> yellow), anchors only; no copied colormap
_RAMP = np.array([[0.10, 0.05, 0.30], [0.15, 0.40, 0.55], [0.20, 0.65, 0.50],
                  [0.70, 0.80, 0.25], [0.99, 0.90, 0.15]], dtype=np.float32)


def _colorize(x: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB along :data:`_RAMP` (NaN -> white: nodata)."""
    pos = np.clip(np.nan_to_num(x, nan=0.0), 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(pos.astype(int), len(_RAMP) - 2)
    f = (pos - i)[..., None]
    out = _RAMP[i] * (1 - f) + _RAMP[i + 1] * f
    out[~np.isfinite(x)] = 1.0
    return out


def _colour_bar(height: int, label: str = "abundance (fraction)") -> Any:
    """A vertical colour bar of the 0-1 ramp with ticks 0, 0.25, 0.5, 0.75, 1 and a label."""
    from PIL import Image, ImageDraw

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
    d.text((2, 4), label.split(" ")[0], fill=_INK, font=f)
    return img


def abundance_png(abundance: np.ndarray, names: Sequence[str] | None = None, max_side: int = 256,
                  gap: int = 8, *, min_side: int = QUICKLOOK_MIN_SIDE) -> bytes:
    """PNG bytes of ``P`` abundance maps ``(P, y, x)`` side by side on one fixed 0-1 ramp.

    Each panel (at least ``min_side`` px on its longer side) is titled with its endmember's name
    (``names``, else ``endmember k``); a colour bar with ticks closes the strip; white is nodata.
    """
    from PIL import Image

    ab = _downsample(np.asarray(abundance, dtype=np.float32), max_side)
    p = ab.shape[0]
    labels = [str(n) for n in names] if names is not None else [f"endmember {k + 1}" for k in range(p)]
    panels = []
    for k in range(p):
        img = Image.fromarray((_colorize(ab[k]) * 255).round().astype(np.uint8), "RGB")
        img = _enlarge(img, min(min_side, max_side))
        panels.append(_titled(img, labels[k], "RGB"))
    bar = _colour_bar(panels[0].height)
    w = sum(q.width for q in panels) + gap * p + bar.width
    canvas = Image.new("RGB", (w, panels[0].height), _WHITE)
    x = 0
    for q in panels:
        canvas.paste(q, (x, 0))
        x += q.width + gap
    canvas.paste(bar, (x, 0))
    return _png(canvas)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    span = max(hi - lo, 1e-12)
    raw = span / max(n - 1, 1)
    mag = 10 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = np.ceil(lo / step) * step
    return [float(v) for v in np.arange(start, hi + step * 0.001, step)]


def spectra_png(wavelength_nm: Sequence[float | None], spectra: Mapping[str, Sequence[float]],
                width: int = 720, height: int = 400, *, title: str = "endmember spectra") -> bytes:
    """PNG bytes of a line plot of endmember spectra against wavelength (nm), with axes and a legend.

    Lines break over gaps in the wavelengths (bad bands left out of the fit, e.g. the water
    absorption bands) and over NaN values, so no line is drawn where there is no data.
    """
    from PIL import Image, ImageDraw

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
        return (left + (x - xlo) / (xhi - xlo) * (right - left), bottom - (y - ylo) / (yhi - ylo) * (bottom - top))

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
    for k, (name, y) in enumerate(ys.items()):
        colour = _LINE_COLOURS[k % len(_LINE_COLOURS)]
        seg: list[tuple[float, float]] = []
        prev = None
        for xv, yv in zip(wl, y, strict=False):
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


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding a PNG in markdown."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------------------------- report
@dataclass
class SceneSummary:
    """What the artifacts show about one scene run (filled from the library's run record)."""

    scene: str
    out_dir: str
    record_path: str = ""
    input_sha256: str = ""
    config_hash: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    solver: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed_tiles: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    quality: dict[str, float | None] = field(default_factory=dict)
    shape: tuple[int, ...] = ()


def solver_summary(stats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate per-tile solver stats (``iterations``, ``residual``, ``converged``)."""
    its = [float(s["iterations"]) for s in stats if s.get("iterations") is not None]
    res = [float(s["residual"]) for s in stats if s.get("residual") is not None]
    conv = [bool(s["converged"]) for s in stats if s.get("converged") is not None]
    out: dict[str, Any] = {"tiles": len(stats)}
    if its:
        out.update(iterations_mean=float(np.mean(its)), iterations_max=float(np.max(its)))
    if res:
        out.update(residual_median=float(np.median(res)), residual_max=float(np.max(res)))
    if conv:
        out["convergence_rate"] = float(np.mean(conv))
        out["not_converged"] = int(len(conv) - sum(conv))
    return out


def _sig(v: Any, digits: int = 3) -> Any:
    """``v`` rounded to ``digits`` significant digits (floats only; None stays None)."""
    if isinstance(v, bool) or not isinstance(v, (float, np.floating)):
        return v
    v = float(v)
    if v == 0 or not np.isfinite(v):
        return v
    return round(v, digits - 1 - int(np.floor(np.log10(abs(v)))))


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (float, np.floating)) and not isinstance(v, bool):
        return f"{float(v):.3g}"
    return str(v)


#: what the solver-statistics columns mean (shown under the table)
SOLVER_NOTE = (
    "A tile *converged* when its fixed-point solver brought the relative residual "
    "‖f(z) − z‖ / ‖f(z)‖ under the model's tolerance within its iteration cap. A tile that did "
    "not converge is still blended (its last iterate) and listed in the run record's "
    "`not_converged_tiles`; 0 of N converged means every tile stopped at the cap, not that the "
    "run failed."
)


def _converged_text(v: Mapping[str, Any]) -> str:
    if "convergence_rate" not in v:
        return "n/a (no solver statistics)"
    n = int(v.get("tiles", 0))
    return f"{n - int(v.get('not_converged', 0))}/{n}"


def report_markdown(s: SceneSummary) -> str:
    """The run report as markdown."""
    lines = [f"# hyperdeq run: `{Path(s.scene).name}`", ""]
    lines += ["## Inputs", "", f"- scene: `{s.scene}`"]
    if s.shape:
        lines.append(f"- shape (band, y, x): {tuple(s.shape)}")
    if s.input_sha256:
        lines.append(f"- input sha256: `{s.input_sha256}`")
    if s.config_hash:
        lines.append(f"- config hash: `{s.config_hash}`")
    if s.config:
        keys = ("tile", "halo", "blend", "denoise", "denoise_arch", "denoise_guard", "denoise_subspace", "unmix", "n_endmembers", "device", "batch_size", "seed")
        lines.append("- config: " + ", ".join(f"{k}={s.config[k]!r}" for k in keys if k in s.config))
    lines += ["", "## Models", ""]
    if s.models:
        lines += ["| model | weights sha256 | halo (px) |", "|---|---|---|"]
        for m in s.models:
            sha = m.get("weights_sha256") or "fitted per scene"
            lines.append(f"| {m.get('name', '?')} | `{str(sha)[:16]}` | {m.get('halo', '')} |")
    else:
        lines.append("(none recorded)")
    if s.quality:
        lines += ["", "## Quality", "", "| indicator | value |", "|---|---|"]
        row = quality_row(s)
        lines += [f"| {k} | {_fmt(v)} |" for k, v in row.items() if k not in ("scene",)]
    lines += ["", "## Timings", ""]
    if s.timings_s:
        lines += ["| stage | wall time (s) |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in s.timings_s.items()]
        lines.append(f"| **total** | **{sum(s.timings_s.values()):.2f}** |")
    lines += ["", "## Solver statistics", ""]
    if s.solver:
        lines += ["| stage | tiles | converged | iterations (mean / max) | relative residual (median / max) |",
                  "|---|---|---|---|---|"]
        for stage, v in s.solver.items():
            its = (f"{v['iterations_mean']:.1f} / {v['iterations_max']:.0f}"
                   if "iterations_mean" in v else "n/a")
            res = (f"{v['residual_median']:.2e} / {v['residual_max']:.2e}"
                   if "residual_median" in v else "n/a")
            lines.append(f"| {stage} | {v.get('tiles', 0)} | {_converged_text(v)} | {its} | {res} |")
        lines += ["", SOLVER_NOTE]
    else:
        lines.append("(no fixed-point solver statistics recorded)")
    lines += ["", f"## Failed tiles ({len(s.failed_tiles)})", ""]
    for t in s.failed_tiles[:50]:
        lines.append(f"- {t.get('stage', '')} tile {t.get('index', '?')}: {t.get('error', '')}")
    if len(s.failed_tiles) > 50:
        lines.append(f"- ... and {len(s.failed_tiles) - 50} more (see the run record)")
    if not s.failed_tiles:
        lines.append("none")
    lines += ["", "## Outputs", ""]
    lines += [f"- {k}: `{v}`" for k, v in s.outputs.items()]
    if s.record_path:
        lines.append(f"- run record: `{s.record_path}`")
    return "\n".join(lines) + "\n"


#: the quality table's columns: each name carries its unit
QUALITY_COLUMNS = ("scene", "status", "reused", "reconstruction RMSE (reflectance)",
                   "denoise residual RMS (reflectance)", "converged tiles (per stage)", "nodata (%)",
                   "failed tiles", "wall time (s)")


def quality_row(s: SceneSummary) -> dict[str, Any]:
    """One row of the quality table: rounded values (3 significant digits), units in the column
    names, convergence as converged/total tiles per stage (the report explains it); None = n/a."""
    q = s.quality
    nod = q.get("nodata_fraction")
    conv = ", ".join(f"{stage} {_converged_text(v)}" for stage, v in s.solver.items() if "convergence_rate" in v)
    values = [Path(s.scene).name, q.get("status"), q.get("reused"), _sig(q.get("reconstruction_rmse")),
              _sig(q.get("denoise_residual_rms")), conv or "n/a (no fixed-point solver statistics)",
              None if nod is None else round(100.0 * float(nod), 1), len(s.failed_tiles),
              round(sum(s.timings_s.values()), 1) if s.timings_s else None]
    return dict(zip(QUALITY_COLUMNS, values, strict=True))


# ---------------------------------------------------------------------------------- publish
@dataclass
class Quicklooks:
    """PNG files written beside the outputs, and their bytes (for data URIs)."""

    files: dict[str, Path] = field(default_factory=dict)
    pngs: dict[str, bytes] = field(default_factory=dict)


def write_quicklooks(out_dir: str | Path, images: Mapping[str, bytes]) -> Quicklooks:
    """Write ``name -> PNG bytes`` to ``out_dir/quicklooks/<name>.png``."""
    q = Quicklooks(pngs=dict(images))
    d = Path(out_dir) / "quicklooks"
    d.mkdir(parents=True, exist_ok=True)
    for name, png in images.items():
        p = d / f"{name}.png"
        p.write_bytes(png)
        q.files[name] = p
    return q


def publish_scene_artifacts(s: SceneSummary, quicklooks: Quicklooks | None = None,
                            image_base_url: str | None = None) -> dict[str, Any]:
    """Create the report, quality-table and quicklook artifacts of one scene; returns their ids.

    The quicklooks are embedded in the report (markdown renders a ``data:`` image inline). Image
    artifacts store only a URL, and the UI shows that URL as text: they are created only when
    ``image_base_url`` (an ``http(s)://`` address that serves the run's output root) is given,
    pointing at the PNG files, never with a base64 payload.
    """
    from prefect.artifacts import (
        create_image_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    base = artifact_key("hyperdeq", Path(s.scene).stem)
    md = report_markdown(s)
    ids: dict[str, Any] = {}
    if quicklooks and quicklooks.pngs:
        md += "\n## Quicklooks\n\n"
        for name, png in quicklooks.pngs.items():
            md += f"**{QUICKLOOK_TITLES.get(name, name)}**\n\n![{name}]({data_uri(png)})\n\n"
            where = quicklooks.files.get(name)
            if where is not None:
                md += f"(file: `{where}`)\n\n"
    ids["report"] = create_markdown_artifact(md, key=artifact_key(base, "report"),
                                             description=f"hyperdeq run report for {s.scene}")
    ids["quality"] = create_table_artifact(
        [quality_row(s)], key=artifact_key(base, "quality"),
        description="per-scene quality indicators (units in the column names; convergence explained in the report)")
    if quicklooks and image_base_url:
        if not image_base_url.startswith(("http://", "https://")):
            raise ValueError(f"image_base_url {image_base_url!r} must be an http(s):// address serving the output root")
        for name, where in quicklooks.files.items():
            try:
                rel = Path(where).resolve().relative_to(Path(s.out_dir).resolve().parent)
            except ValueError:
                rel = Path(where).name  # type: ignore[assignment]
            ids[f"image:{name}"] = create_image_artifact(
                f"{image_base_url.rstrip('/')}/{Path(rel).as_posix()}", key=artifact_key(base, name),
                description=f"{QUICKLOOK_TITLES.get(name, name)} of {Path(s.scene).name}")
    return ids


def publish_sweep_table(rows: Sequence[Mapping[str, Any]], key: str = "hyperdeq-sweep") -> UUID:
    """Table artifact listing each scene of a sweep with its status and reason."""
    from prefect.artifacts import create_table_artifact

    return create_table_artifact([dict(r) for r in rows], key=key,
                                 description="scenes of this sweep: processed, skipped, failed")


# ---------------------------------------------------------------------------------- from a run
INGESTED = "ingest/scene.zarr"


def _outputs(record: Mapping[str, Any]) -> dict[str, str]:
    """``{key: path relative to the run}`` of a run record (entries are paths or ``{"path": ...}``)."""
    return {k: str(v["path"] if isinstance(v, Mapping) else v) for k, v in (record.get("outputs") or {}).items()}


def _strided(da: Any, max_side: int) -> np.ndarray:
    """Load a lazily opened (..., y, x) DataArray subsampled to at most ``max_side`` per side."""
    h, w = da.shape[-2:]
    step = max(1, int(np.ceil(max(h, w) / max_side)))
    return np.asarray(da[..., ::step, ::step].values, dtype=np.float32)


def scene_quality(run_dir: str | Path, record: Mapping[str, Any], max_side: int = 512) -> dict[str, float | None]:
    """Per-scene quality indicators from a finished run (subsampled reads, bounded memory).

    * ``reconstruction_rmse``: mean per-pixel RMSE of the unmixing model (Y vs E·A);
    * ``denoise_residual_rms``: RMS of (input - denoised) over good bands and valid pixels;
    * ``convergence_rate``: fraction of ok tiles whose fixed-point solver converged;
    * ``nodata_fraction``: fraction of pixels that are nodata in the input.
    """
    from pipeline.ingest import open_zarr_scene
    from pipeline.scene import good_band_index, valid_mask
    from pipeline.writers import open_output

    run_dir = Path(run_dir)
    outputs = _outputs(record)
    q: dict[str, float | None] = {}
    scene = open_zarr_scene(run_dir / INGESTED)
    valid = _strided(valid_mask(scene), max_side).astype(bool)
    q["nodata_fraction"] = float(1.0 - valid.mean()) if valid.size else None
    if "abundances_zarr" in outputs:
        rmse = _strided(open_output(run_dir / outputs["abundances_zarr"], "rmse"), max_side)
        fin = rmse[np.isfinite(rmse)]
        q["reconstruction_rmse"] = float(fin.mean()) if fin.size else None
    if "denoised_zarr" in outputs:
        good = good_band_index(scene)
        den = _strided(open_output(run_dir / outputs["denoised_zarr"], "denoised").isel(band=good), max_side)
        src = _strided(scene.isel(band=good), max_side)
        diff = (src - den)[:, valid]
        diff = diff[np.isfinite(diff)]
        q["denoise_residual_rms"] = float(np.sqrt(np.mean(diff**2))) if diff.size else None
    conv = [t.get("converged") for ts in record.get("tiles", {}).values() for t in ts
            if t.get("status") == "ok" and t.get("converged") is not None]
    q["convergence_rate"] = float(np.mean(conv)) if conv else None
    return q


def summary_from_record(run_dir: str | Path, reused: bool = False) -> SceneSummary:
    """Fill a :class:`SceneSummary` from ``run_dir/run.json`` and the outputs beside it."""
    from pipeline.provenance import load_run_record

    run_dir = Path(run_dir)
    rec = load_run_record(run_dir)
    timings = {k: float(v["wall_s"]) for k, v in rec.get("stages", {}).items()
               if isinstance(v, Mapping) and v.get("wall_s") is not None}
    solver = {stage: solver_summary(tiles) for stage, tiles in rec.get("tiles", {}).items()}
    failed = []
    tiles_by_key = {(st, t.get("key")): t for st, ts in rec.get("tiles", {}).items() for t in ts}
    for f in rec.get("failed_tiles", []):
        stage, _, key = str(f).partition(":")
        t = tiles_by_key.get((stage, key), {})
        failed.append({"stage": stage, "index": key, "error": t.get("error") or ""})
    s = SceneSummary(
        scene=rec.get("input", {}).get("path", ""), out_dir=str(run_dir),
        record_path=str(run_dir / "run.json"), input_sha256=rec.get("input", {}).get("sha256", ""),
        config_hash=rec.get("config_hash", ""), config=rec.get("config", {}),
        models=list(rec.get("models", [])), timings_s=timings, solver=solver, failed_tiles=failed,
        outputs={k: str(run_dir / v) for k, v in _outputs(rec).items()},
    )
    s.quality = scene_quality(run_dir, rec)
    s.quality["status"] = rec.get("status")  # type: ignore[assignment]
    s.quality["reused"] = reused  # type: ignore[assignment]
    return s


QUICKLOOK_TITLES = {"before_rgb": "input (before denoising)", "after_rgb": "denoised (after)",
                    "abundances": "abundance maps", "endmember_spectra": "endmember spectra"}


def render_quicklooks(run_dir: str | Path) -> dict[str, bytes]:
    """``before_rgb``, ``after_rgb`` (denoised), ``abundances`` (labelled, colour bar) and
    ``endmember_spectra`` (against wavelength) PNGs of a finished run, each at least
    :data:`QUICKLOOK_MIN_SIDE` px wide."""
    import json

    from pipeline.ingest import open_zarr_scene
    from pipeline.provenance import load_run_record
    from pipeline.writers import open_output

    run_dir = Path(run_dir)
    outputs = _outputs(load_run_record(run_dir))
    scene = open_zarr_scene(run_dir / INGESTED)
    bands = rgb_bands(scene["wavelength"].values, scene.sizes["band"], scene["good_band"].values)
    wl = [float(scene["wavelength"].values[b]) for b in bands]
    images = {"before_rgb": rgb_png(_strided(scene.isel(band=list(bands)), QUICKLOOK_MAX_SIDE), (0, 1, 2),
                                    title=rgb_title(QUICKLOOK_TITLES["before_rgb"], wl))}
    if "denoised_zarr" in outputs:
        den = open_output(run_dir / outputs["denoised_zarr"], "denoised").isel(band=list(bands))
        images["after_rgb"] = rgb_png(_strided(den, QUICKLOOK_MAX_SIDE), (0, 1, 2),
                                      title=rgb_title(QUICKLOOK_TITLES["after_rgb"], wl))
    if "abundances_zarr" in outputs:
        ab = open_output(run_dir / outputs["abundances_zarr"], "abundances")
        names = [str(n) for n in ab["endmember"].values]
        images["abundances"] = abundance_png(_strided(ab, 256), names)
    if "endmembers_json" in outputs and (run_dir / outputs["endmembers_json"]).is_file():
        em = json.loads((run_dir / outputs["endmembers_json"]).read_text())
        images["endmember_spectra"] = spectra_png(em["wavelength_nm"], em["endmembers"])
    return images
