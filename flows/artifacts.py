"""Prefect artifacts that make a run watchable from its flow-run page.

* a **progress** artifact, updated as tile batches finish (:class:`ProgressReporter`, a callable
  with the library's ``progress(done, total, info)`` signature);
* a **markdown run report**: inputs, models, timings, solver statistics, failed tiles, outputs;
* a **table** of per-scene quality indicators (reconstruction error, convergence rate, nodata);
* **quicklooks**: before/after RGB and abundance maps as PNG. Prefect 3.8's image artifact only
  stores a URL, and a flow-run page cannot reach files on the worker, so the PNGs are embedded as
  base64 ``data:`` URIs (in a markdown artifact, and as an image artifact) and also written next
  to the outputs.

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
class ProgressReporter:
    """Progress artifact of one stage, updated at most every ``min_interval_s`` (and at the end).

    Called as ``reporter(done, total, info)`` by the library's tile loop; logs each update too.
    Outside a Prefect run it only logs.
    """

    def __init__(self, key: str, description: str, min_interval_s: float = 1.0) -> None:
        self.key = key
        self.description = description
        self.min_interval_s = min_interval_s
        self.artifact_id: UUID | None = None
        self.last: float = -1.0
        self._last_t = 0.0
        self.failed = 0
        if _in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(0.0, key=key, description=description)

    def __call__(self, done: int, total: int, info: Mapping[str, Any] | None = None) -> None:
        pct = 100.0 if total <= 0 else round(100.0 * done / total, 1)
        info = dict(info or {})
        if info.get("status") == "failed":
            self.failed += 1
        now = time.monotonic()
        if pct < 100.0 and now - self._last_t < self.min_interval_s:
            return
        self._last_t = now
        if pct == self.last:
            return
        self.last = pct
        log.info("%s: %d/%d tiles (%.1f %%)%s", self.description, done, total, pct,
                 f", {self.failed} failed" if self.failed else "")
        if self.artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            try:
                update_progress_artifact(self.artifact_id, pct, description=self.description)
            except Exception as exc:  # a monitoring hiccup must never fail the science
                log.warning("could not update progress artifact %r: %s", self.key, exc)


# ---------------------------------------------------------------------------------- images
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


def rgb_png(cube: np.ndarray, bands: tuple[int, int, int], max_side: int = QUICKLOOK_MAX_SIDE) -> bytes:
    """PNG bytes of a ``(band, y, x)`` cube shown as RGB from ``bands``; nodata is transparent."""
    from PIL import Image

    sub = _downsample(np.asarray(cube[list(bands)], dtype=np.float32), max_side)
    valid = np.isfinite(sub).all(axis=0)
    rgb = np.stack([_stretch(b) for b in sub], axis=-1)
    rgba = np.concatenate([rgb, valid[..., None].astype(np.float32)], axis=-1)
    img = Image.fromarray((np.nan_to_num(rgba) * 255).round().astype(np.uint8), mode="RGBA")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# a perceptually ordered ramp (dark blue -> teal -> yellow), anchors only; no copied colormap
_RAMP = np.array([[0.10, 0.05, 0.30], [0.15, 0.40, 0.55], [0.20, 0.65, 0.50],
                  [0.70, 0.80, 0.25], [0.99, 0.90, 0.15]], dtype=np.float32)


def _colorize(x: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB along :data:`_RAMP` (NaN -> black)."""
    pos = np.clip(np.nan_to_num(x, nan=0.0), 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(pos.astype(int), len(_RAMP) - 2)
    f = (pos - i)[..., None]
    out = _RAMP[i] * (1 - f) + _RAMP[i + 1] * f
    out[~np.isfinite(x)] = 0.0
    return out


def abundance_png(abundance: np.ndarray, max_side: int = 192, gap: int = 4) -> bytes:
    """PNG bytes of ``P`` abundance maps ``(P, y, x)`` side by side, each on a fixed 0-1 ramp."""
    from PIL import Image

    ab = _downsample(np.asarray(abundance, dtype=np.float32), max_side)
    p, h, w = ab.shape
    canvas = np.ones((h, p * w + (p - 1) * gap, 3), dtype=np.float32)
    for k in range(p):
        canvas[:, k * (w + gap): k * (w + gap) + w] = _colorize(ab[k])
    img = Image.fromarray((canvas * 255).round().astype(np.uint8), mode="RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding a PNG in markdown or an image artifact."""
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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


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
        keys = ("tile", "halo", "blend", "denoise", "unmix", "n_endmembers", "device", "batch_size", "seed")
        lines.append("- config: " + ", ".join(f"{k}={s.config[k]!r}" for k in keys if k in s.config))
    lines += ["", "## Models", ""]
    if s.models:
        lines += ["| model | weights sha256 | halo |", "|---|---|---|"]
        for m in s.models:
            sha = m.get("weights_sha256") or "fitted per scene"
            lines.append(f"| {m.get('name', '?')} | `{str(sha)[:16]}` | {m.get('halo', '')} |")
    else:
        lines.append("(none recorded)")
    lines += ["", "## Timings", ""]
    if s.timings_s:
        lines += ["| stage | wall time (s) |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in s.timings_s.items()]
        lines.append(f"| **total** | **{sum(s.timings_s.values()):.2f}** |")
    lines += ["", "## Solver statistics", ""]
    if s.solver:
        cols = sorted({k for v in s.solver.values() for k in v})
        lines += ["| stage | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for stage, v in s.solver.items():
            lines.append(f"| {stage} | " + " | ".join(_fmt(v.get(c, "")) for c in cols) + " |")
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


QUALITY_COLUMNS = ("scene", "reconstruction_rmse", "convergence_rate", "nodata_fraction",
                   "failed_tiles", "wall_s")


def quality_row(s: SceneSummary) -> dict[str, Any]:
    """One row of the quality table (missing indicators are None)."""
    row: dict[str, Any] = {"scene": Path(s.scene).name}
    for c in QUALITY_COLUMNS[1:]:
        row[c] = s.quality.get(c)
    row["failed_tiles"] = len(s.failed_tiles)
    row["wall_s"] = round(sum(s.timings_s.values()), 2) if s.timings_s else None
    return row


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


def publish_scene_artifacts(s: SceneSummary, quicklooks: Quicklooks | None = None) -> dict[str, Any]:
    """Create the report, quality-table and quicklook artifacts of one scene; returns their ids."""
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
            md += f"**{name}**\n\n![{name}]({data_uri(png)})\n\n"
            where = quicklooks.files.get(name)
            if where is not None:
                md += f"(file: `{where}`)\n\n"
    ids["report"] = create_markdown_artifact(md, key=artifact_key(base, "report"),
                                             description=f"hyperdeq run report for {s.scene}")
    ids["quality"] = create_table_artifact([quality_row(s)], key=artifact_key(base, "quality"),
                                           description="per-scene quality indicators")
    if quicklooks:
        for name, png in quicklooks.pngs.items():
            ids[f"image:{name}"] = create_image_artifact(
                data_uri(png), key=artifact_key(base, name),
                description=f"{name} quicklook of {Path(s.scene).name} (also {quicklooks.files.get(name)})",
            )
    return ids


def publish_sweep_table(rows: Sequence[Mapping[str, Any]], key: str = "hyperdeq-sweep") -> UUID:
    """Table artifact listing each scene of a sweep with its status and reason."""
    from prefect.artifacts import create_table_artifact

    return create_table_artifact([dict(r) for r in rows], key=key,
                                 description="scenes of this sweep: processed, skipped, failed")
