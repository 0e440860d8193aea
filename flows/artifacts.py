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

Rendering lives in :mod:`pipeline.quicklooks` (numpy + Pillow), shared with the run's own
quicklook PNGs, and is tested without a server.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np

# the quicklooks are drawn by pipeline.quicklooks (the run folder's PNGs too)
from pipeline.quicklooks import (
    QUICKLOOK_MAX_SIDE,
    abundance_png,
    data_uri,
    rgb_bands,
    rgb_png,
    rgb_title,
    spectra_png,
)

log = logging.getLogger("hyperdeq.flows.artifacts")

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
    """One progress artifact per scene, moved forward as stages and tiles finish, with an ETA.

    ``stages`` lists the stages in order; the library calls ``progress(stage, done, total)``
    from its tile loops (``denoise``, ``blend_denoise``, ``unmix``, ``blend_unmix``) once per
    finished tile, and the flow calls :meth:`stage_done` after each stage. Overall progress =
    (finished stages + fraction of the current one) / number of stages. The description gives the
    stage's tiles done and an ETA for the stage: its elapsed time (since the previous stage ended)
    / tiles done × tiles left. Updates are throttled to one per ``min_interval_s``; outside a
    Prefect run it only logs. A monitoring hiccup never fails the run.
    """

    def __init__(
        self,
        key: str,
        scene: str,
        stages: Sequence[str],
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        min_interval_s: float = 1.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.key, self.scene, self.stages = key, scene, list(stages)
        self.log = logger or log
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.artifact_id: UUID | None = None
        self.percent = 0.0
        self.description = ""
        self.eta_s: float | None = None
        self.done_stages: set[str] = set()
        self._last_t = 0.0
        self._stage_t0: dict[str, float] = {}
        self._prev_end = clock()
        if _in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(
                0.0, key=key, description=f"{scene}: starting ({len(self.stages)} stages)"
            )

    def _stage_pos(self, stage: str) -> int:
        return self.stages.index(stage) if stage in self.stages else len(self.done_stages)

    def _push(self, percent: float, description: str, force: bool) -> None:
        self.description = description
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

    def eta(self, stage: str, done: int, total: int) -> float | None:
        """Seconds left in ``stage``: its elapsed time / tiles done × tiles left (None before a tile)."""
        if done <= 0 or total <= 0:
            return None
        if done >= total:
            return 0.0
        elapsed = self.clock() - self._stage_t0.setdefault(stage, self._prev_end)
        return max(0.0, elapsed / done * (total - done))

    def __call__(self, stage: str, done: int, total: int) -> None:
        self._stage_t0.setdefault(stage, self._prev_end)
        frac = 1.0 if total <= 0 else done / total
        pct = round(100.0 * (self._stage_pos(stage) + frac) / max(len(self.stages), 1), 1)
        self.eta_s = self.eta(stage, done, total)
        left = "" if self.eta_s is None or done >= total else f", ETA {_duration(self.eta_s)}"
        desc = f"{self.scene}: {stage} {done}/{total} tiles{left}"
        self.log.info("%s (scene %.0f %%)", desc, pct)
        self._push(min(pct, 100.0), desc, force=done >= total)

    def stage_done(self, stage: str) -> None:
        self.done_stages.add(stage)
        self._prev_end = self.clock()
        self.eta_s = None
        pct = round(100.0 * (self._stage_pos(stage) + 1) / max(len(self.stages), 1), 1)
        self._push(min(pct, 100.0), f"{self.scene}: {stage} done", force=True)


def _duration(s: float) -> str:
    """``45 s``, ``3 min 20 s``, ``1 h 05 min``."""
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def scene_progress(
    scene: str, stages: Sequence[str], logger: logging.Logger | logging.LoggerAdapter | None = None
) -> SceneProgress:
    """The progress artifact of one scene run (key ``hyperdeq-<scene>-progress``)."""
    return SceneProgress(
        artifact_key("hyperdeq", Path(scene).stem, "progress"), scene, stages, logger
    )


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
    """Aggregate per-tile solver stats (``iterations``, ``residual``, ``converged``; with per-pixel
    stopping also ``converged_pixels`` of ``valid_pixels``, summed)."""
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
    px = [s for s in stats if s.get("valid_pixels") is not None]
    if px:
        out["converged_pixels"] = sum(int(s.get("converged_pixels", 0)) for s in px)
        out["valid_pixels"] = sum(int(s["valid_pixels"]) for s in px)
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
    "run failed. With per-pixel stopping (the unmixer) every pixel is solved on its own and a "
    "tile converges only when all its pixels do: the percentage is the pixels that converged."
)


def _converged_text(v: Mapping[str, Any]) -> str:
    if "convergence_rate" not in v:
        return "n/a (no solver statistics)"
    n = int(v.get("tiles", 0))
    text = f"{n - int(v.get('not_converged', 0))}/{n}"
    if v.get("valid_pixels"):  # per-pixel stopping: a tile converges only when all its pixels do
        text += f" ({100.0 * v['converged_pixels'] / v['valid_pixels']:.1f} % of pixels)"
    return text


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
        keys = (
            "tile",
            "halo",
            "blend",
            "denoise",
            "denoise_arch",
            "denoise_guard",
            "denoise_subspace",
            "unmix",
            "n_endmembers",
            "device",
            "batch_size",
            "seed",
        )
        lines.append(
            "- config: " + ", ".join(f"{k}={s.config[k]!r}" for k in keys if k in s.config)
        )
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
        lines += [
            "| stage | tiles | converged | iterations (mean / max) | relative residual (median / max) |",
            "|---|---|---|---|---|",
        ]
        for stage, v in s.solver.items():
            its = (
                f"{v['iterations_mean']:.1f} / {v['iterations_max']:.0f}"
                if "iterations_mean" in v
                else "n/a"
            )
            res = (
                f"{v['residual_median']:.2e} / {v['residual_max']:.2e}"
                if "residual_median" in v
                else "n/a"
            )
            lines.append(
                f"| {stage} | {v.get('tiles', 0)} | {_converged_text(v)} | {its} | {res} |"
            )
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
QUALITY_COLUMNS = (
    "scene",
    "status",
    "reused",
    "reconstruction RMSE (reflectance)",
    "denoise residual RMS (reflectance)",
    "converged tiles (per stage; % of pixels with per-pixel stopping)",
    "nodata (%)",
    "failed tiles",
    "wall time (s)",
)


def quality_row(s: SceneSummary) -> dict[str, Any]:
    """One row of the quality table: rounded values (3 significant digits), units in the column
    names, convergence as converged/total tiles per stage (the report explains it); None = n/a."""
    q = s.quality
    nod = q.get("nodata_fraction")
    conv = ", ".join(
        f"{stage} {_converged_text(v)}" for stage, v in s.solver.items() if "convergence_rate" in v
    )
    values = [
        Path(s.scene).name,
        q.get("status"),
        q.get("reused"),
        _sig(q.get("reconstruction_rmse")),
        _sig(q.get("denoise_residual_rms")),
        conv or "n/a (no fixed-point solver statistics)",
        None if nod is None else round(100.0 * float(nod), 1),
        len(s.failed_tiles),
        round(sum(s.timings_s.values()), 1) if s.timings_s else None,
    ]
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


def publish_scene_artifacts(
    s: SceneSummary, quicklooks: Quicklooks | None = None, image_base_url: str | None = None
) -> dict[str, Any]:
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
    ids["report"] = create_markdown_artifact(
        md, key=artifact_key(base, "report"), description=f"hyperdeq run report for {s.scene}"
    )
    ids["quality"] = create_table_artifact(
        [quality_row(s)],
        key=artifact_key(base, "quality"),
        description="per-scene quality indicators (units in the column names; convergence explained in the report)",
    )
    if quicklooks and image_base_url:
        if not image_base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"image_base_url {image_base_url!r} must be an http(s):// address serving the output root"
            )
        for name, where in quicklooks.files.items():
            try:
                rel = Path(where).resolve().relative_to(Path(s.out_dir).resolve().parent)
            except ValueError:
                rel = Path(where).name  # type: ignore[assignment]
            ids[f"image:{name}"] = create_image_artifact(
                f"{image_base_url.rstrip('/')}/{Path(rel).as_posix()}",
                key=artifact_key(base, name),
                description=f"{QUICKLOOK_TITLES.get(name, name)} of {Path(s.scene).name}",
            )
    return ids


def publish_sweep_table(rows: Sequence[Mapping[str, Any]], key: str = "hyperdeq-sweep") -> UUID:
    """Table artifact listing each scene of a sweep with its status and reason."""
    from prefect.artifacts import create_table_artifact

    return create_table_artifact(
        [dict(r) for r in rows],
        key=key,
        description="scenes of this sweep: processed, skipped, failed",
    )


# ---------------------------------------------------------------------------------- from a run
INGESTED = "ingest/scene.zarr"


def _outputs(record: Mapping[str, Any]) -> dict[str, str]:
    """``{key: path relative to the run}`` of a run record (entries are paths or ``{"path": ...}``)."""
    return {
        k: str(v["path"] if isinstance(v, Mapping) else v)
        for k, v in (record.get("outputs") or {}).items()
    }


def _strided(da: Any, max_side: int) -> np.ndarray:
    """Load a lazily opened (..., y, x) DataArray subsampled to at most ``max_side`` per side."""
    h, w = da.shape[-2:]
    step = max(1, int(np.ceil(max(h, w) / max_side)))
    return np.asarray(da[..., ::step, ::step].values, dtype=np.float32)


def scene_quality(
    run_dir: str | Path, record: Mapping[str, Any], max_side: int = 512
) -> dict[str, float | None]:
    """Per-scene quality indicators from a finished run (subsampled reads, bounded memory).

    * ``reconstruction_rmse``: mean per-pixel RMSE of the unmixing model (Y vs E·A, or s·E·A with
      the scaled mixing model);
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
        den = _strided(
            open_output(run_dir / outputs["denoised_zarr"], "denoised").isel(band=good), max_side
        )
        src = _strided(scene.isel(band=good), max_side)
        diff = (src - den)[:, valid]
        diff = diff[np.isfinite(diff)]
        q["denoise_residual_rms"] = float(np.sqrt(np.mean(diff**2))) if diff.size else None
    conv = [
        t.get("converged")
        for ts in record.get("tiles", {}).values()
        for t in ts
        if t.get("status") == "ok" and t.get("converged") is not None
    ]
    q["convergence_rate"] = float(np.mean(conv)) if conv else None
    return q


def summary_from_record(run_dir: str | Path, reused: bool = False) -> SceneSummary:
    """Fill a :class:`SceneSummary` from ``run_dir/run.json`` and the outputs beside it."""
    from pipeline.provenance import load_run_record

    run_dir = Path(run_dir)
    rec = load_run_record(run_dir)
    timings = {
        k: float(v["wall_s"])
        for k, v in rec.get("stages", {}).items()
        if isinstance(v, Mapping) and v.get("wall_s") is not None
    }
    solver = {stage: solver_summary(tiles) for stage, tiles in rec.get("tiles", {}).items()}
    failed = []
    tiles_by_key = {(st, t.get("key")): t for st, ts in rec.get("tiles", {}).items() for t in ts}
    for f in rec.get("failed_tiles", []):
        stage, _, key = str(f).partition(":")
        t = tiles_by_key.get((stage, key), {})
        failed.append({"stage": stage, "index": key, "error": t.get("error") or ""})
    s = SceneSummary(
        scene=rec.get("input", {}).get("path", ""),
        out_dir=str(run_dir),
        record_path=str(run_dir / "run.json"),
        input_sha256=rec.get("input", {}).get("sha256", ""),
        config_hash=rec.get("config_hash", ""),
        config=rec.get("config", {}),
        models=list(rec.get("models", [])),
        timings_s=timings,
        solver=solver,
        failed_tiles=failed,
        outputs={k: str(run_dir / v) for k, v in _outputs(rec).items()},
    )
    s.quality = scene_quality(run_dir, rec)
    s.quality["status"] = rec.get("status")  # type: ignore[assignment]
    s.quality["reused"] = reused  # type: ignore[assignment]
    return s


QUICKLOOK_TITLES = {
    "before_rgb": "input (before denoising)",
    "after_rgb": "denoised (after)",
    "abundances": "abundance maps",
    "endmember_spectra": "endmember spectra",
}


def render_quicklooks(run_dir: str | Path) -> dict[str, bytes]:
    """``before_rgb``, ``after_rgb`` (denoised), ``abundances`` (labelled, colour bar) and
    ``endmember_spectra`` (against wavelength) PNGs of a finished run, each at least
    :data:`pipeline.quicklooks.QUICKLOOK_MIN_SIDE` px wide."""
    import json

    from pipeline.ingest import open_zarr_scene
    from pipeline.provenance import load_run_record
    from pipeline.writers import open_output

    run_dir = Path(run_dir)
    outputs = _outputs(load_run_record(run_dir))
    scene = open_zarr_scene(run_dir / INGESTED)
    bands = rgb_bands(scene["wavelength"].values, scene.sizes["band"], scene["good_band"].values)
    wl = [float(scene["wavelength"].values[b]) for b in bands]
    images = {
        "before_rgb": rgb_png(
            _strided(scene.isel(band=list(bands)), QUICKLOOK_MAX_SIDE),
            (0, 1, 2),
            title=rgb_title(QUICKLOOK_TITLES["before_rgb"], wl),
        )
    }
    if "denoised_zarr" in outputs:
        den = open_output(run_dir / outputs["denoised_zarr"], "denoised").isel(band=list(bands))
        images["after_rgb"] = rgb_png(
            _strided(den, QUICKLOOK_MAX_SIDE),
            (0, 1, 2),
            title=rgb_title(QUICKLOOK_TITLES["after_rgb"], wl),
        )
    if "abundances_zarr" in outputs:
        ab = open_output(run_dir / outputs["abundances_zarr"], "abundances")
        names = [str(n) for n in ab["endmember"].values]
        images["abundances"] = abundance_png(_strided(ab, 256), names)
    if "endmembers_json" in outputs and (run_dir / outputs["endmembers_json"]).is_file():
        em = json.loads((run_dir / outputs["endmembers_json"]).read_text())
        images["endmember_spectra"] = spectra_png(em["wavelength_nm"], em["endmembers"])
    return images
