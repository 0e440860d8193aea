"""The pipeline's stages: plain functions with small, typed inputs and outputs (paths, summaries).

:func:`workers.run.sequence` orders them, once, for both ``hyperdeq run`` and the Prefect flow.
Each stage resumes: it reuses what a previous attempt of the same run finished (a complete store,
committed tiles, a saved fit) and redoes the rest. Outputs are built under ``_staging/`` and move
to their final names only when the run completes (:func:`promote_outputs`), so a failed run
never leaves a final-named output.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import provenance as prov
from pipeline import tiles as tstore
from pipeline.blend import BlendTarget, blend_stage
from pipeline.errors import ClusterError, ProvenanceError
from pipeline.grid import plan_grid
from pipeline.hashing import output_entry
from pipeline.quicklooks import quicklook_abundances, quicklook_rgb, quicklook_spectra, rgb_bands
from pipeline.records import FrozenMap, JsonFields, TileRecord, freeze, thaw
from pipeline.runner import StageResult, TileModel, run_tiles
from pipeline.writers import (
    confined_path,
    create_output_zarr,
    geo_attrs,
    mark_complete,
    open_output,
    spectral_band_metadata,
    update_output_attrs,
    write_cog,
)
from workers.infer import gpu_name
from workers.plan import RunPlan

StageProgress = Callable[[str, int, int], None]

_log = logging.getLogger("hyperdeq.run")

STAGES = "_stages"
STAGING = "_staging"
INGESTED = "ingest/scene.zarr"
TILES = "tiles"
TILES_INPUT = "tiles/input.zarr"
TILES_UNMIX_INPUT = "tiles/unmix_input.zarr"
FIT_DIR = "unmix_fit"
OUT_NAMES = {
    "denoised_zarr": "denoised.zarr",
    "denoised_tif": "denoised.tif",
    "abundances_zarr": "abundances.zarr",
    "abundances_tif": "abundances.tif",
    "rmse_tif": "rmse.tif",
    "endmembers_csv": "endmembers.csv",
    "endmembers_json": "endmembers.json",
    "quicklook_rgb": "quicklook_rgb.png",
    "quicklook_abundances": "quicklook_abundances.png",
    "quicklook_spectra": "quicklook_spectra.png",
    "stac_item": prov.STAC_JSON,
}
#: the blended store each model stage writes
BLENDED = {"denoise": "denoised_zarr", "unmix": "abundances_zarr"}


@dataclass(frozen=True)
class StageEnv:
    """What a stage runs on: executors for model and other tasks, the number of workers, progress.

    Not part of any result: the Prefect flow passes it to its tasks unhashed (``quote``).
    """

    model_executor: Executor | None = None
    executor: Executor | None = None
    n_workers: int = 1
    progress: StageProgress | None = None
    log: Callable[[str], None] = _log.info
    cluster: dict[str, Any] = field(default_factory=dict)
    client: Any = None
    tile_models: dict[str, TileModel] = field(default_factory=dict)
    #: opens the cluster when the first stage that needs it starts (ingest, tiling and the
    #: unmixer's fit run in this process, so bad input is refused before any cluster starts)
    opener: Callable[[], StageEnv] | None = field(default=None, compare=False, repr=False)
    _opened: dict[str, StageEnv] = field(default_factory=dict, compare=False, repr=False)

    def ready(self) -> StageEnv:
        """This environment with its cluster open (opened now, once, when it is opened lazily)."""
        if self.opener is None:
            return self
        if "env" not in self._opened:
            self._opened["env"] = self.opener()
        return self._opened["env"]

    def cluster_info(self) -> dict[str, Any]:
        """The cluster's description when one was used (without opening one)."""
        if self.opener is None:
            return self.cluster
        env = self._opened.get("env")
        return env.cluster if env is not None else {}


# ---------------------------------------------------------------------------- small helpers
def staged(run_dir: str | Path, key: str) -> Path:
    """Where output ``key`` is built during a run (it moves to ``run_dir/<name>`` on completion)."""
    return confined_path(Path(run_dir) / STAGING, OUT_NAMES[key])


def _stage_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / STAGES / f"{name}.json"


def _split(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    """``cls``'s keyword arguments from its JSON form: its fields, the other keys as ``stats``."""
    names = {f.name for f in fields(cls)} - {"stats"}
    return {
        **{k: v for k, v in d.items() if k in names},
        "stats": {k: v for k, v in d.items() if k not in names},
    }


@dataclass(frozen=True)
class StageSummary(JsonFields):
    """What a stage other than a model stage leaves in ``_stages/<name>.json``: its result's path,
    its source, its wall time; the stage's own figures (a tile grid, the band count, a fit's
    endmembers, the band guard's blending weights, the written outputs) in ``stats``, written at the
    top level of the JSON beside the typed fields."""

    wall_s: float
    path: str | None = None
    source: str | None = None
    stats: Mapping[str, Any] = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stats", freeze(self.stats or {}))

    def to_json(self) -> dict[str, Any]:
        out = {**thaw(self.stats), "wall_s": self.wall_s}
        out.update(
            {k: v for k, v in (("path", self.path), ("source", self.source)) if v is not None}
        )
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StageSummary:
        return cls(**_split(cls, d))


@dataclass(frozen=True)
class ModelSummary(JsonFields):
    """What a model stage (``denoise``, ``unmix``) leaves in ``_stages/<stage>.json``: its tile
    stores, model, channels, and the tiles' outcome; per-pixel convergence, for models that report
    it, in ``stats`` (written at the top level of the JSON)."""

    stage: str
    path: str
    source: str
    model: str
    weights_sha256: str | None
    halo: int
    channels: tuple[str, ...]
    wall_s: float
    n_tiles: int
    n_ok: int
    failed: tuple[str, ...]
    not_converged: tuple[str, ...]
    n_reused: int
    stats: Mapping[str, Any] = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        for k in ("channels", "failed", "not_converged", "stats"):
            object.__setattr__(self, k, freeze(getattr(self, k)))

    def to_json(self) -> dict[str, Any]:
        return {
            **thaw(self.stats),
            **{f.name: thaw(getattr(self, f.name)) for f in fields(self) if f.name != "stats"},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ModelSummary:
        return cls(**_split(cls, d))


#: the stages whose summary is a :class:`ModelSummary`
MODEL_STAGES = ("denoise", "unmix")


def save_stage(
    run_dir: Path, name: str, summary: StageSummary | ModelSummary
) -> StageSummary | ModelSummary:
    p = _stage_path(run_dir, name)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary.to_json(), indent=1, sort_keys=True, default=str))
    os.replace(tmp, p)
    return summary


def load_stage(run_dir: str | Path, name: str) -> StageSummary | ModelSummary | None:
    """The summary a stage left in ``run_dir`` (None when it has not run): a :class:`ModelSummary`
    for the model stages, a :class:`StageSummary` for the others."""
    p = _stage_path(Path(run_dir), name)
    if not p.is_file():
        return None
    d = json.loads(p.read_text())
    return ModelSummary.from_json(d) if name in MODEL_STAGES else StageSummary.from_json(d)


def load_model_stage(run_dir: str | Path, stage: str) -> ModelSummary | None:
    """The summary model stage ``stage`` left in ``run_dir`` (None when it has not run)."""
    s = load_stage(run_dir, stage) if stage in MODEL_STAGES else None
    return s if isinstance(s, ModelSummary) else None


@contextmanager
def _executor_for(executor: Executor | None, n: int) -> Any:
    """Use ``executor``; without one, a thread pool of ``n`` (in-process, no cluster)."""
    if executor is not None:
        yield executor
        return
    with ThreadPoolExecutor(max_workers=max(1, n)) as ex:
        yield ex


def _open_scene_any(path: str | Path) -> Any:
    """A canonical scene from an ingested zarr or from a denoised output."""
    path = Path(path)
    if path.name == OUT_NAMES["denoised_zarr"]:
        return open_output(path, "denoised")
    from pipeline.ingest import open_zarr_scene

    return open_zarr_scene(path)


def _source_digest(scene_zarr: str | Path) -> str:
    """What identifies the content of a stage input: a blended output's tile digest, else its path."""
    import zarr

    try:
        attrs = dict(zarr.open_group(str(scene_zarr), mode="r").attrs)
    except Exception:
        return str(scene_zarr)
    return str(attrs.get("tiles_digest") or scene_zarr)


# ---------------------------------------------------------------------------- stages
def stage_ingest(plan: RunPlan) -> Path:
    """Ingest the scene into the run's zarr (reused when already complete)."""
    from pipeline.ingest import ingest_scene, open_zarr_scene

    run_dir = plan.run_dir
    dest = run_dir / INGESTED
    if dest.exists():
        try:
            open_zarr_scene(dest)
            return dest
        except Exception:
            shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ingest_scene(
        plan.scene,
        dest,
        chunk=max(plan.config.chunk, 256),
        overwrite=False,
        source_sha256=plan.input_sha256,
    )
    save_stage(
        run_dir,
        "ingest",
        StageSummary(time.perf_counter() - t0, path=str(dest), source=str(plan.scene)),
    )
    return dest


def stage_tile(plan: RunPlan, scene_zarr: Path, name: str = "input") -> Path:
    """Cut the scene (good bands) into the overlapping tile store ``tiles/<name>.zarr``."""
    from pipeline.scene import good_band_index, valid_mask

    cfg = plan.config
    run_dir = plan.run_dir
    dest = run_dir / TILES / f"{name}.zarr"
    digest = _source_digest(scene_zarr)
    if tstore.is_complete(dest) and tstore.store_attrs(dest).get("source_digest") == digest:
        return dest
    if dest.exists():  # incomplete, or cut from an older version of its source
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scene = _open_scene_any(scene_zarr)
    good = good_band_index(scene)
    plan.check_tile_memory(len(good), tuple(scene.shape[1:]))
    valid = valid_mask(scene).data  # dask for ingested scenes: never the whole mask in memory
    tile = int(cfg.tile or 0)
    grid = plan_grid(
        scene.shape[1:], tile, int(cfg.halo or 0), tile_valid=tstore.tile_validity(valid, tile)
    )
    tstore.write_input_tiles(
        scene, grid, dest, bands=good, attrs={"source": str(scene_zarr), "source_digest": digest}
    )
    tstore.write_valid_mask(valid, dest, cfg.chunk)
    save_stage(
        run_dir,
        f"tile_{name}",
        StageSummary(
            time.perf_counter() - t0,
            path=str(dest),
            stats={"grid": grid.to_dict(), "n_good_bands": len(good)},
        ),
    )
    return dest


#: exception class names meaning "the cluster went away", not "this tile is bad"
LOST_NAMES = ("CancelledError", "FutureCancelledError", "CommClosedError", "StreamClosedError")


def client_lost(client: Any) -> bool:
    """True when a distributed client is no longer connected to its scheduler."""
    if client is None or not hasattr(client, "status"):
        return False
    return str(getattr(client, "status", "running")) not in ("running", "newly-created")


def scheduler_address(client: Any, fallback: str | None = None) -> str | None:
    addr = (
        getattr(getattr(client, "scheduler", None), "address", None) if client is not None else None
    )
    return str(addr or fallback) if (addr or fallback) else None


def cluster_lost_error(stage: str, address: str | None, detail: str) -> ClusterError:
    what = (
        f"the Dask scheduler at {address}"
        if address
        else "the cluster (tasks cancelled by the executor)"
    )
    return ClusterError(
        f"lost {what} during the {stage} stage ({detail}); finished tiles are kept and the run is "
        "marked failed: make sure the scheduler is up (or run without --scheduler), then rerun the "
        "same command to resume"
    )


def _tile_model(plan: RunPlan, stage: str, env: StageEnv, fit_dir: Path | None) -> TileModel:
    if stage in env.tile_models:
        return env.tile_models[stage]
    return plan.job.options(stage).tile_model(plan.config.device, fit_dir)


def _pixel_convergence(records: tuple[TileRecord, ...]) -> dict[str, Any]:
    """Pixels whose own solve converged, summed over the tiles (models with per-pixel stopping)."""
    stats = [r.stats for r in records if r.ok]
    if not any("converged_pixels" in st for st in stats):
        return {}
    conv = sum(int(st.get("converged_pixels", 0)) for st in stats)
    valid = sum(int(st.get("valid_pixels", 0)) for st in stats)
    return {
        "converged_pixels": conv,
        "valid_pixels": valid,
        "converged_pixel_fraction": round(conv / valid, 4) if valid else None,
    }


def stage_model(
    plan: RunPlan, stage: str, tile_store: Path, env: StageEnv, fit_dir: Path | None = None
) -> ModelSummary:
    """Run a model stage (``denoise`` or ``unmix``) over every tile; returns the stage summary."""
    env = env.ready()
    model = _tile_model(plan, stage, env, fit_dir)
    run_dir = plan.run_dir
    grid = tstore.open_grid(tile_store)
    attrs = tstore.store_attrs(tile_store)
    n_in = len(attrs["band_index"])
    channels = (
        list(model.out_names)
        if model.out_names is not None
        else [f"b{b}" for b in attrs["band_index"]]
    )
    dest = run_dir / TILES / f"{stage}.zarr"
    tstore.create_output_store(
        dest, grid, channels, attrs={"model": model.name, "in_channels": n_in}
    )
    progress = env.progress
    cb = (lambda d, t, _r: progress(stage, d, t)) if progress else None
    with _executor_for(env.model_executor, env.n_workers) as ex:
        from workers.tile_feed import feed_for  # per-tile progress from Dask workers

        res: StageResult = run_tiles(
            ex,
            model,
            tile_store,
            dest,
            grid,
            batch_size=plan.config.batch_size,
            stage=stage,
            progress=cb,
            n_workers=env.n_workers,
            feed=feed_for(env.client, ex, dest) if cb else None,
        )
    # batches the cluster dropped (scheduler gone) are not tile failures: stop before anything blends them
    lost = [
        r.key
        for r in res.records
        if r.status == "failed"
        and str(r.error or "").startswith("task failed:")
        and any(n in str(r.error or "") for n in LOST_NAMES)
    ]
    if lost or client_lost(env.client):
        detail = (
            f"{len(lost)} of {len(res.records)} tiles cancelled or cut off"
            if lost
            else f"the client is {getattr(env.client, 'status', '?')!s}"
        )
        raise cluster_lost_error(stage, scheduler_address(env.client), detail)
    summary = ModelSummary(
        stage=stage,
        path=str(dest),
        source=str(tile_store),
        model=model.name,
        weights_sha256=model.weights_sha256,
        halo=model.halo,
        channels=tuple(channels),
        wall_s=res.wall_s,
        **prov.summarise_tiles([r.to_json() for r in res.records]),
        n_reused=sum(r.reused for r in res.records),
        stats=_pixel_convergence(res.records),
    )
    env.log(
        f"{stage}: {summary.n_ok}/{summary.n_tiles} tiles ok, {len(summary.not_converged)} not "
        f"converged, {len(summary.failed)} failed, {summary.n_reused} reused, in {res.wall_s:.1f} s"
    )
    save_stage(run_dir, stage, summary)
    return summary


def stage_fit_unmixer(plan: RunPlan, scene_zarr: Path, env: StageEnv) -> Path:
    """Fit DEQ-Unmix on the scene (the denoised one when denoising is on); reused when saved."""
    from workers.unmix.fit import fit_scene

    say = env.log
    opts = plan.job.unmix
    assert opts is not None
    run_dir = plan.run_dir
    dest = run_dir / FIT_DIR
    marker = dest / ".hyperdeq_complete"
    digest = _source_digest(scene_zarr)
    if marker.is_file() and marker.read_text().strip() == digest:
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    t0 = time.perf_counter()
    scene = _open_scene_any(scene_zarr)
    kw = opts.fit_kwargs()
    cap = f"/{kw['max_epochs']}" if kw.get("max_epochs") else ""
    last = [0.0]

    def _log_epoch(epoch: int, loss: float) -> None:  # progress on the longest single-process stage
        now = time.perf_counter()
        if epoch == 0 or now - last[0] >= 10.0:
            last[0] = now
            say(
                f"fit unmixer: epoch {epoch + 1}{cap} (stops early when the held-out loss stalls), "
                f"loss {loss:.3g}, {now - t0:.0f} s"
            )

    fit = fit_scene(scene, opts.endmembers, seed=plan.config.seed, progress=_log_epoch, **kw)
    say(
        f"fit unmixer: {len(fit.names)} endmembers ({', '.join(map(str, fit.names))}), "
        f"mixing model {fit.mixing}, in {time.perf_counter() - t0:.0f} s"
    )
    fit.save(dest)
    marker.write_text(digest + "\n")  # the fit is valid for this version of its input only
    save_stage(
        run_dir,
        "fit_unmixer",
        StageSummary(
            time.perf_counter() - t0,
            path=str(dest),
            source=str(scene_zarr),
            stats={
                "n_endmembers": len(fit.names),
                "names": [str(n) for n in fit.names],
                "provenance": getattr(fit, "provenance", {}),
            },
        ),
    )
    return dest


def _tiles_digest(summary: ModelSummary) -> str:
    import hashlib

    recs = tstore.load_records(summary.path)
    blob = json.dumps(sorted((k, r.checksum, r.status) for k, r in recs.items()))
    return hashlib.sha256(blob.encode()).hexdigest()


def _blend_targets(
    stage: str, dest: Path, like: Any, summary: ModelSummary, chunk: int, attrs: dict[str, Any]
) -> list[BlendTarget]:
    channels = summary.channels
    if stage == "denoise":
        band_index = tstore.store_attrs(summary.source)["band_index"]
        arrays = create_output_zarr(
            dest,
            "denoised",
            like,
            channel_dim="band",
            chunk=chunk,
            attrs=attrs,
            channel_coords={k: like[k].values for k in ("band", "wavelength", "fwhm", "good_band")},
        )
        return [
            BlendTarget(
                arrays["denoised"], tuple(range(len(channels))), tuple(int(b) for b in band_index)
            )
        ]
    names = channels[:-1]
    arrays = create_output_zarr(
        dest,
        "abundances",
        like,
        channel_dim="endmember",
        chunk=chunk,
        attrs=attrs,
        channel_coords={"endmember": np.asarray(names, dtype=object)},
        extra=[("rmse", None, None)],
    )
    return [
        BlendTarget(arrays["abundances"], tuple(range(len(names))), tuple(range(len(names)))),
        BlendTarget(arrays["rmse"], (len(names),), ()),
    ]


def stage_blend(plan: RunPlan, stage: str, env: StageEnv) -> Path:
    """Blend a model stage's tiles into its (staged) output zarr: ``denoised.zarr`` or ``abundances.zarr``."""
    import zarr

    env = env.ready()
    from pipeline.ingest import open_zarr_scene

    cfg = plan.config
    run_dir = plan.run_dir
    summary = load_model_stage(run_dir, stage)
    if summary is None:
        raise ProvenanceError(
            f"stage {stage!r} has not run in {str(run_dir)!r}; run it before blending"
        )
    digest = _tiles_digest(summary)
    dest = staged(run_dir, BLENDED[stage])
    if dest.exists():
        a = dict(zarr.open_group(str(dest), mode="r").attrs)
        if a.get("hyperdeq_complete") and a.get("tiles_digest") == digest and not summary.failed:
            return dest
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    like = open_zarr_scene(run_dir / INGESTED)
    grid = tstore.open_grid(summary.source)
    attrs = {
        "model": summary.model,
        "weights_sha256": summary.weights_sha256,
        "blend": cfg.blend,
        "tile": cfg.tile,
        "halo": cfg.halo,
    }
    targets = _blend_targets(stage, dest, like, summary, cfg.chunk, attrs)
    recs = tstore.load_records(summary.path)
    ok_keys = {k for k, r in recs.items() if r.ok}
    # every tile is checked against the sha256 recorded when it was written, as it is read for blending
    checksums = {k: recs[k].checksum for k in ok_keys}
    progress = env.progress
    cb = (lambda d, t: progress(f"blend_{stage}", d, t)) if progress else None
    mix, mix_rec = None, {}
    opts = plan.job.options(stage)
    if stage not in env.tile_models and hasattr(opts, "blend_mix"):
        mix, mix_rec = opts.blend_mix(recs[k].stats for k in sorted(ok_keys))
    with _executor_for(env.executor, env.n_workers) as ex:
        blend_stage(
            ex,
            summary.path,
            summary.source,
            grid,
            targets,
            chunk=cfg.chunk,
            blend=cfg.blend,
            ok_keys=ok_keys,
            progress=cb,
            checksums=checksums,
            mix=mix,
        )
    mark_complete(dest, tiles_digest=digest, failed_tiles=list(summary.failed))
    save_stage(
        run_dir,
        f"blend_{stage}",
        StageSummary(time.perf_counter() - t0, path=str(dest), stats=mix_rec),
    )
    return dest


def _scene_var(store: Path) -> str:
    import zarr

    g = zarr.open_group(str(store), mode="r")
    names = [k for k, a in g.arrays() if a.ndim == 3]
    if not names:
        raise ProvenanceError(
            f"no 3-D array in {str(store)!r}; the ingested scene is damaged, rerun"
        )
    return names[0]


def _atomic(dest: Path, write: Callable[[Path], Any]) -> None:
    """Write ``dest`` through a temporary path beside it, renamed only when ``write`` succeeds."""
    tmp = dest.with_name(f".{dest.stem}.{os.getpid()}.tmp{dest.suffix}")
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _write_denoised(
    run_dir: Path, like: Any, tags: dict[str, str], outputs: dict[str, str]
) -> None:
    z = staged(run_dir, "denoised_zarr")
    outputs["denoised_zarr"] = OUT_NAMES["denoised_zarr"]
    wl = like["wavelength"].values
    good = like["good_band"].values.astype(bool)
    meta = spectral_band_metadata(like)  # wavelength, FWHM, units, good-band flag per band
    _atomic(
        staged(run_dir, "denoised_tif"),
        lambda tmp: write_cog(
            z / "denoised",
            tmp,
            like,
            descriptions=meta["descriptions"],
            band_tags=meta["band_tags"],
            tags=tags,
        ),
    )
    outputs["denoised_tif"] = OUT_NAMES["denoised_tif"]
    _atomic(
        staged(run_dir, "quicklook_rgb"),
        lambda tmp: quicklook_rgb(z / "denoised", rgb_bands(wl, len(wl), good), tmp),
    )
    outputs["quicklook_rgb"] = OUT_NAMES["quicklook_rgb"]


def _cog(src: Path, tmp: Path, *, like: Any, descriptions: list[str], tags: dict[str, str]) -> None:
    write_cog(src, tmp, like, descriptions=descriptions, tags=tags)


def _write_abundances(
    run_dir: Path, like: Any, tags: dict[str, str], outputs: dict[str, str], rgb: bool
) -> None:
    from workers.infer import load_fit
    from workers.unmix.fit import write_endmembers

    z = staged(run_dir, "abundances_zarr")
    outputs["abundances_zarr"] = OUT_NAMES["abundances_zarr"]
    names = [str(n) for n in open_output(z, "abundances")["endmember"].values]
    for key, var, desc in (("abundances_tif", "abundances", names), ("rmse_tif", "rmse", ["rmse"])):
        _atomic(
            staged(run_dir, key),
            functools.partial(_cog, z / var, like=like, descriptions=desc, tags=tags),
        )
        outputs[key] = OUT_NAMES[key]
    _atomic(
        staged(run_dir, "quicklook_abundances"),
        lambda tmp: quicklook_abundances(z / "abundances", tmp, names=names),
    )
    outputs["quicklook_abundances"] = OUT_NAMES["quicklook_abundances"]
    csv, js = staged(run_dir, "endmembers_csv"), staged(run_dir, "endmembers_json")
    _atomic(
        csv,
        lambda tmp_csv: _atomic(
            js, lambda tmp_js: write_endmembers(load_fit(str(run_dir / FIT_DIR)), tmp_csv, tmp_js)
        ),
    )
    outputs["endmembers_csv"], outputs["endmembers_json"] = (
        OUT_NAMES["endmembers_csv"],
        OUT_NAMES["endmembers_json"],
    )
    _atomic(staged(run_dir, "quicklook_spectra"), lambda tmp: quicklook_spectra(js, tmp))
    outputs["quicklook_spectra"] = OUT_NAMES["quicklook_spectra"]
    if rgb:
        scene = run_dir / INGESTED
        wl, good = like["wavelength"].values, like["good_band"].values.astype(bool)
        _atomic(
            staged(run_dir, "quicklook_rgb"),
            lambda tmp: quicklook_rgb(
                scene / _scene_var(scene),
                rgb_bands(wl, len(wl), good),
                tmp,
                label="input reflectance",
            ),
        )
        outputs["quicklook_rgb"] = OUT_NAMES["quicklook_rgb"]


def stage_write(plan: RunPlan) -> dict[str, str]:
    """COGs, quicklooks and endmember tables from the blended zarr outputs, all staged; returns
    ``{key: name}``. Always rewritten: their inputs may have changed since an earlier attempt."""
    from pipeline.ingest import open_zarr_scene

    run_dir = plan.run_dir
    like = open_zarr_scene(run_dir / INGESTED)
    outputs: dict[str, str] = {}
    t0 = time.perf_counter()
    tags = {"hyperdeq_run": plan.run_id}
    if plan.job.denoise is not None:
        _write_denoised(run_dir, like, tags, outputs)
    if plan.job.unmix is not None:
        _write_abundances(run_dir, like, tags, outputs, rgb=plan.job.denoise is None)
    save_stage(run_dir, "write", StageSummary(time.perf_counter() - t0, stats={"outputs": outputs}))
    return outputs


def _tile_row(rec: TileRecord) -> dict[str, Any]:
    """A tile's line in ``run.json``: its record's fields (None when absent) and its report's
    figures: DECSC's band guard (this tile's own weights: mean, max, bands with w > 0.5), its
    spectral-subspace pass (k, pixels kept outside, impulse pixels and lines cleaned), the unmixer's
    converged pixels."""
    keys = (
        "key",
        "index",
        "status",
        "worker",
        "device",
        "wall_s",
        "iterations",
        "residual",
        "converged",
        "checksum",
        "error",
    )
    r = rec.to_json()
    return {
        **{k: r.get(k) for k in keys},
        **{
            k: v
            for k, v in (r.get("stats") or {}).items()
            if (k.startswith("guard") and k != "guard_w")
            or k.startswith(("subspace", "precision"))
            or k in ("converged_pixels", "valid_pixels")
        },
    }


def _models_and_tiles(
    plan: RunPlan,
) -> tuple[
    list[dict[str, Any]],
    dict[str, Any],
    list[str],
    list[str],
    dict[str, StageSummary | ModelSummary],
]:
    run_dir = plan.run_dir
    stages: dict[str, StageSummary | ModelSummary] = {}
    tiles: dict[str, list[dict[str, Any]]] = {}
    failed: list[str] = []
    not_conv: list[str] = []
    models = []
    for stage in MODEL_STAGES:
        s = load_model_stage(run_dir, stage)
        if s is None:
            continue
        stages[stage] = s
        tiles[stage] = [_tile_row(r) for _, r in sorted(tstore.load_records(s.path).items())]
        failed += [f"{stage}:{k}" for k in s.failed]
        not_conv += [f"{stage}:{k}" for k in s.not_converged]
        m: dict[str, Any] = {
            "name": s.model,
            "stage": stage,
            "halo": s.halo,
            "weights_sha256": s.weights_sha256,
        }
        if stage == "unmix":
            m = {**m, "weights_sha256": None, "fit_sha256": s.weights_sha256}
        models.append(m)
    for extra in (
        "ingest",
        "tile_input",
        "fit_unmixer",
        "tile_unmix_input",
        "blend_denoise",
        "blend_unmix",
        "write",
    ):
        summary = load_stage(run_dir, extra)
        if summary is not None:
            stages[extra] = summary
    for m in models:  # e.g. the band guard's weights applied when the denoised tiles were blended
        blend = stages.get(f"blend_{m['stage']}")
        if blend is not None:
            m.update({k: v for k, v in blend.to_json().items() if k not in ("path", "wall_s")})
    return models, tiles, failed, not_conv, stages


def _stac(plan: RunPlan, record: dict[str, Any], like: Any) -> dict[str, Any]:
    """The run's STAC Item: acquisition time, spectral bands and endmembers from the scene and the staged outputs."""
    geo = geo_attrs(like)
    bbox = geometry = None
    if like.rio.crs is not None:
        try:
            from rasterio.warp import transform_bounds

            b = transform_bounds(like.rio.crs, "EPSG:4326", *like.rio.bounds())
            bbox = [float(v) for v in b]
            geometry = {
                "type": "Polygon",
                "coordinates": [
                    [[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]], [b[0], b[1]]]
                ],
            }
        except Exception:
            pass
    return prov.stac_item(record, geo, bbox, geometry, scene=like, run_dir=plan.run_dir / STAGING)


def _input_policy(store: Path, like: Any) -> dict[str, Any]:
    """What the ingest made nodata (values outside the physical range, per band) and the bad bands."""
    import zarr

    h: dict[str, Any] = dict(zarr.open_group(str(store), mode="r").attrs).get("hyperdeq") or {}  # type: ignore[assignment]
    oor = [int(v) for v in h.get("out_of_range_per_band") or []]
    good = np.asarray(like["good_band"].values, dtype=bool)
    return {
        "out_of_range_total": int(sum(oor)),
        "out_of_range_per_band": oor,
        "bad_bands": [int(i) for i in np.flatnonzero(~good)],
    }


def promote_outputs(run_dir: Path, outputs: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Move the staged outputs to their final names; returns their run.json entries (size, sha256)."""
    entries: dict[str, dict[str, Any]] = {}
    for key, name in outputs.items():
        src, dst = Path(run_dir) / STAGING / name, confined_path(run_dir, name)
        if src.exists():
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            os.replace(src, dst)
        entries[key] = output_entry(dst, run_dir)
    return entries


def stage_record(plan: RunPlan, outputs: dict[str, str], env: StageEnv, start: str) -> Path:
    """Finish the run: promote the outputs, write the STAC Item and ``run.json`` (last: the commit marker).

    The run is complete only when no tile failed; otherwise the outputs stay staged and the record
    says ``failed`` with the tiles.
    """
    from pipeline.ingest import open_zarr_scene

    run_dir = plan.run_dir
    models, tiles, failed, not_conv, stages = _models_and_tiles(plan)
    status = prov.COMPLETE if not failed and outputs else prov.FAILED
    record: dict[str, Any] = {
        **plan.record_head(),
        "status": status,
        "start": start,
        "end": prov.now(),
        "models": models,
        "packages": prov.package_versions(),
        "code_version": prov.code_version(),
        "host": prov.host_info(gpu_name(import_torch=False)),
        "cluster": env.cluster_info(),
        "failed_tiles": failed,
        "not_converged_tiles": not_conv,
        "tiles": tiles,
        "stages": {
            k: {kk: vv for kk, vv in v.to_json().items() if kk not in ("failed", "not_converged")}
            for k, v in stages.items()
        },
    }
    like = open_zarr_scene(run_dir / INGESTED)
    record["input"].update(_input_policy(run_dir / INGESTED, like))
    for key in ("denoised_zarr", "abundances_zarr"):
        if key in outputs:
            update_output_attrs(
                run_dir / STAGING / outputs[key],
                {
                    "hyperdeq_run": json.loads(
                        json.dumps({k: v for k, v in record.items() if k != "tiles"}, default=str)
                    )
                },
            )
    if status != prov.COMPLETE:
        record["outputs"] = {}
        record["error"] = (
            f"{len(failed)} tiles failed: {failed[:10]!r}; rerun the same command to retry them"
        )
        return prov.write_run_record(run_dir, record)
    staged_stac = staged(run_dir, "stac_item")
    staged_stac.write_text(json.dumps(_stac(plan, {**record, "outputs": outputs}, like), indent=2))
    entries = promote_outputs(run_dir, {**outputs, "stac_item": OUT_NAMES["stac_item"]})
    record["outputs"] = entries
    path = prov.write_run_record(run_dir, record)  # last: the commit marker
    if not plan.config.keep_tiles:
        shutil.rmtree(run_dir / TILES, ignore_errors=True)
    shutil.rmtree(run_dir / STAGING, ignore_errors=True)
    return path
