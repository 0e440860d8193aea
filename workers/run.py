"""Pipeline stages, each one call with small inputs and outputs (paths, small dicts).

These are what the Prefect flow wraps as tasks, and what :func:`run_scene` composes:

    stage_ingest → stage_tile → stage_denoise → stage_blend("denoised")
                 → stage_fit_unmixer → stage_tile(denoised) → stage_unmix → stage_blend("abundances")
                 → stage_write → stage_record

A run lives in ``out_root/<scene>/<run_id>/`` where the run id is derived from the input's sha256,
the configuration hash and the model weights' sha256s: rerunning the same scene with the same
configuration and weights resumes (completed tiles are skipped, outputs are byte-identical) or
returns the completed run; any change gives a new run directory. Every stage writes a small
summary under ``_stages/`` that later stages and the run record read.

When a stage raises, :func:`run_scene` rewrites ``run.json`` with status ``failed``, the stage and
the error before re-raising: a :class:`~pipeline.errors.HyperdeqError` as is, an ``OSError`` (disk
full, permissions) as :class:`~pipeline.errors.WriteError`, a lost Dask scheduler (cancelled tasks,
closed comms, disconnected client) as :class:`~pipeline.errors.ClusterError`. Nothing is marked
complete on that path and finished tiles stay committed, so the same command resumes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import provenance as prov
from pipeline import tiles as tstore
from pipeline.blend import BlendTarget, blend_stage
from pipeline.config import RunConfig
from pipeline.errors import (
    ClusterError,
    ConfigError,
    HyperdeqError,
    ModelError,
    ProvenanceError,
    WriteError,
)
from pipeline.grid import plan_grid
from pipeline.runner import StageResult, TileModel, run_tiles
from pipeline.writers import (
    confined_path,
    create_output_zarr,
    geo_attrs,
    mark_complete,
    open_output,
    quicklook_abundances,
    quicklook_rgb,
    rgb_bands,
    safe_name,
    write_cog,
)

StageProgress = Callable[[str, int, int], None]

_log = logging.getLogger("hyperdeq.run")

STAGES = "_stages"
INGESTED = "ingest/scene.zarr"
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
}


@dataclass
class RunResult:
    """What :func:`run_scene` returns: where the outputs are and how the run went."""

    run_id: str
    run_dir: Path
    status: str
    outputs: dict[str, Path] = field(default_factory=dict)
    failed_tiles: list[str] = field(default_factory=list)
    not_converged: list[str] = field(default_factory=list)
    reused: bool = False
    n_tiles: int = 0


# ---------------------------------------------------------------------------- small helpers
def _stage_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / STAGES / f"{name}.json"


def _save_stage(run_dir: Path, name: str, summary: dict[str, Any]) -> dict[str, Any]:
    p = _stage_path(run_dir, name)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    os.replace(tmp, p)
    return summary


def load_stage(run_dir: str | Path, name: str) -> dict[str, Any] | None:
    """The summary a stage left in ``run_dir`` (None when it has not run)."""
    p = _stage_path(Path(run_dir), name)
    return json.loads(p.read_text()) if p.is_file() else None


@contextmanager
def _executor_for(executor: Executor | None, config: RunConfig) -> Iterator[Executor]:
    """Use ``executor``; without one, a thread pool of ``config.workers`` (in-process, no cluster)."""
    if executor is not None:
        yield executor
        return
    with ThreadPoolExecutor(max_workers=config.workers or 2) as ex:
        yield ex


def model_halos(config: RunConfig, denoise_model: TileModel | None = None) -> dict[str, int]:
    """Declared halos of the enabled models (registry specs unless a model is given)."""
    from workers.registry import get_spec

    out: dict[str, int] = {}
    if config.denoise:
        out[denoise_model.name if denoise_model else "decsc"] = int(
            denoise_model.halo if denoise_model else get_spec("decsc").halo
        )
    if config.unmix:
        out["deq-unmix"] = int(get_spec("deq-unmix").halo)
    return out


def model_weights(config: RunConfig, denoise_model: TileModel | None = None) -> dict[str, str | None]:
    """Weights sha256 of each enabled model (the unmixer is fitted per scene: its spec hash, if any)."""
    from workers.registry import get_spec

    out: dict[str, str | None] = {}
    if config.denoise:
        if denoise_model is not None:
            out[denoise_model.name] = denoise_model.weights_sha256
        else:
            from workers.denoise.api import arch_weights

            out["decsc"] = arch_weights(config.denoise_arch)[1]
    if config.unmix:
        out["deq-unmix"] = get_spec("deq-unmix").weights_sha256
    return out


def _band_guard_record(blend_summary: dict[str, Any] | None) -> dict[str, Any]:
    """The band guard applied when the denoised tiles were blended: file, sha256, per-band weights."""
    if not blend_summary or not blend_summary.get("band_guard"):
        return {}
    return {"band_guard": blend_summary["band_guard"]}


def run_config_hash(config: RunConfig) -> str:
    """The configuration hash a run is named by: the user's settings plus the models' algorithm.

    ``RunConfig.config_hash()`` covers what the user chose; the enabled models' solver settings
    (DECSC's registry spec) and DEQ-Unmix's fit defaults are folded in, so a release that changes
    how a model computes never resumes tiles or reuses a fit computed the old way.
    """
    import hashlib

    from workers.registry import get_spec

    algo: dict[str, Any] = {}
    if config.denoise:
        from workers.denoise.api import ARCH_PRESETS

        spec = get_spec("decsc")
        from workers.denoise.spec import GUARD_WEIGHTS_SHA256

        algo["decsc"] = {"solver": spec.solver, "config": {**spec.config, **ARCH_PRESETS[config.denoise_arch]},
                         "band_guard_sha256": GUARD_WEIGHTS_SHA256 if config.denoise_guard else None,
                         "subspace_k": config.denoise_subspace}
    if config.unmix:
        from workers.unmix.fit import DEFAULTS

        algo["deq-unmix"] = {"solver": get_spec("deq-unmix").solver, "fit": DEFAULTS}
    blob = json.dumps([config.config_hash(), algo], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def plan_run(
    scene_path: str | Path, out_root: str | Path, config: RunConfig, denoise_model: TileModel | None = None
) -> dict[str, Any]:
    """Resolve the halo, hash the input, and name the run directory (no data processed)."""
    scene_path = Path(scene_path)
    if not scene_path.exists():
        raise ConfigError(f"scene {str(scene_path)!r} does not exist; check the path")
    halos = model_halos(config, denoise_model)
    cfg = config.with_model_halos(list(halos.values()))
    short = {m: h for m, h in halos.items() if cfg.halo is not None and cfg.halo < h}
    if short:
        _log.warning(
            "halo %s px is smaller than the halo the model(s) declare (%s): tile borders may show in the "
            "output (docs/models/decsc.md, Limits); leave --halo unset to use the models' own",
            cfg.halo, ", ".join(f"{m} {h} px" for m, h in short.items()))
    weights = model_weights(cfg, denoise_model)
    input_sha = prov.sha256_path(scene_path)
    config_hash = run_config_hash(cfg)
    run_id = prov.make_run_id(input_sha, config_hash, weights)
    name = safe_name(scene_path.name.split(".")[0])
    run_dir = confined_path(out_root, name, run_id)
    return {
        "run_id": run_id, "run_dir": str(run_dir), "input": {"path": str(scene_path.resolve()), "sha256": input_sha},
        "config": cfg, "config_hash": config_hash, "weights": weights, "halos": halos,
    }


# ---------------------------------------------------------------------------- stages
def stage_ingest(scene_path: str | Path, run_dir: str | Path, config: RunConfig) -> Path:
    """Ingest the scene into the run's zarr (reused when already complete)."""
    from pipeline.ingest import ingest_scene, open_zarr_scene

    dest = Path(run_dir) / INGESTED
    if dest.exists():
        try:
            open_zarr_scene(dest)
            return dest
        except Exception:
            shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ingest_scene(scene_path, dest, chunk=max(config.chunk, 256), overwrite=False)
    _save_stage(Path(run_dir), "ingest", {"path": str(dest), "source": str(scene_path), "wall_s": time.perf_counter() - t0})
    return dest


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


def stage_tile(scene_zarr: str | Path, run_dir: str | Path, config: RunConfig, *, name: str = "input") -> Path:
    """Cut the scene (good bands) into the overlapping tile store ``tiles/<name>.zarr``."""
    from pipeline.scene import good_band_index, valid_mask

    run_dir = Path(run_dir)
    dest = run_dir / "tiles" / f"{name}.zarr"
    digest = _source_digest(scene_zarr)
    if tstore.is_complete(dest) and tstore.store_attrs(dest).get("source_digest") == digest:
        return dest
    if dest.exists():  # incomplete, or cut from an older version of its source
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scene = _open_scene_any(scene_zarr)
    good = good_band_index(scene)
    config.check_tile_memory(len(good))
    valid = valid_mask(scene).data  # dask for ingested scenes: never the whole mask in memory
    grid = plan_grid(scene.shape[1:], config.tile, int(config.halo or 0),
                     tile_valid=tstore.tile_validity(valid, config.tile))
    tstore.write_input_tiles(scene, grid, dest, bands=good,
                             attrs={"source": str(scene_zarr), "source_digest": digest})
    tstore.write_valid_mask(valid, dest, config.chunk)
    _save_stage(run_dir, f"tile_{name}", {
        "path": str(dest), "grid": grid.to_dict(), "n_good_bands": len(good), "wall_s": time.perf_counter() - t0,
    })
    return dest


#: exception class names meaning "the cluster went away", not "this tile is bad"
_LOST_NAMES = ("CancelledError", "FutureCancelledError", "CommClosedError", "StreamClosedError")


def _is_cluster_loss(exc: BaseException) -> bool:
    """True for a cancelled task or a closed scheduler connection (also when chained)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(c.__name__ in _LOST_NAMES for c in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False


def _client_of(executor: Any) -> Any:
    """The ``distributed.Client`` behind a ``ClientExecutor`` (else None: thread pools, ...)."""
    return getattr(executor, "_client", None)


def _client_lost(client: Any) -> bool:
    """True when a distributed client is no longer connected to its scheduler."""
    if client is None or not hasattr(client, "status"):
        return False
    return str(getattr(client, "status", "running")) not in ("running", "newly-created")


def _scheduler_address(client: Any, fallback: str | None = None) -> str | None:
    addr = getattr(getattr(client, "scheduler", None), "address", None) if client is not None else None
    return str(addr or fallback) if (addr or fallback) else None


def _cluster_lost_error(stage: str, address: str | None, detail: str) -> ClusterError:
    what = f"the Dask scheduler at {address}" if address else "the cluster (tasks cancelled by the executor)"
    return ClusterError(
        f"lost {what} during the {stage} stage ({detail}); finished tiles are kept and the run is "
        "marked failed: make sure the scheduler is up (or run without --scheduler), then rerun the "
        "same command to resume"
    )


def _model_stage(
    stage: str, model: TileModel, tile_store: Path, run_dir: Path, config: RunConfig,
    executor: Executor | None, progress: StageProgress | None, submit: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    grid = tstore.open_grid(tile_store)
    attrs = tstore.store_attrs(tile_store)
    n_in = len(attrs["band_index"])
    channels = list(model.out_names) if model.out_names is not None else [f"b{b}" for b in attrs["band_index"]]
    dest = run_dir / "tiles" / f"{stage}.zarr"
    tstore.create_output_store(dest, grid, channels, attrs={"model": model.name, "in_channels": n_in})
    cb = (lambda d, t, _r: progress(stage, d, t)) if progress else None
    with _executor_for(executor, config) as ex:
        res: StageResult = run_tiles(ex, model, tile_store, dest, grid, batch_size=config.batch_size,
                                     stage=stage, progress=cb, submit=submit)
        client = _client_of(ex)
    # batches the cluster dropped (scheduler gone) are not tile failures: stop before anything blends them
    lost = [r["key"] for r in res.records if r.get("status") == "failed"
            and str(r.get("error", "")).startswith("task failed:")
            and any(n in str(r.get("error", "")) for n in _LOST_NAMES)]
    if lost or _client_lost(client):
        detail = (f"{len(lost)} of {len(res.records)} tiles cancelled or cut off" if lost
                  else f"the client is {getattr(client, 'status', '?')!s}")
        raise _cluster_lost_error(stage, _scheduler_address(client), detail)
    summary = {
        "stage": stage, "path": str(dest), "source": str(tile_store), "model": model.name,
        "weights_sha256": model.weights_sha256, "halo": model.halo, "channels": channels,
        "wall_s": res.wall_s, **prov.summarise_tiles(res.records),
        "n_reused": sum(bool(r.get("reused")) for r in res.records),
    }
    return _save_stage(run_dir, stage, summary)


def stage_denoise(
    tile_store: str | Path, run_dir: str | Path, config: RunConfig, *, executor: Executor | None = None,
    progress: StageProgress | None = None, model: TileModel | None = None, submit: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Run the denoiser (DECSC, or ``model``) over every tile; returns the stage summary."""
    from workers.infer import DenoiseTileModel

    m = model if model is not None else DenoiseTileModel.from_registry(config.device, config.denoise_arch,
                                                                       config.denoise_guard, config.denoise_subspace)
    return _model_stage("denoise", m, Path(tile_store), Path(run_dir), config, executor, progress, submit)


def stage_fit_unmixer(scene_zarr: str | Path, run_dir: str | Path, config: RunConfig,
                      log: Callable[[str], None] | None = None) -> Path:
    """Fit DEQ-Unmix on the scene (the denoised one when denoising is on); reused when saved.

    ``log`` receives a progress line at most every 10 s (default: the ``hyperdeq.run`` logger).
    """
    say = log or _log.info
    from workers.unmix.fit import fit_scene

    run_dir = Path(run_dir)
    dest = run_dir / FIT_DIR
    marker = dest / ".hyperdeq_complete"
    digest = _source_digest(scene_zarr)
    if marker.is_file() and marker.read_text().strip() == digest:
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    t0 = time.perf_counter()
    scene = _open_scene_any(scene_zarr)
    kw: dict[str, Any] = {"max_epochs": config.unmix_epochs} if config.unmix_epochs is not None else {}
    max_epochs = int(kw.get("max_epochs", 0)) or None
    last = [0.0]

    def _log_epoch(epoch: int, loss: float) -> None:  # progress on the longest single-process stage
        now = time.perf_counter()
        if epoch == 0 or now - last[0] >= 10.0:
            last[0] = now
            cap = f"/{max_epochs}" if max_epochs else ""
            say(f"fit unmixer: epoch {epoch + 1}{cap} (stops early when the held-out loss stalls), "
                f"loss {loss:.3g}, {now - t0:.0f} s")

    fit = fit_scene(scene, config.n_endmembers, seed=config.seed, progress=_log_epoch, **kw)
    say(f"fit unmixer: {len(fit.names)} endmembers ({', '.join(map(str, fit.names))}) "
        f"in {time.perf_counter() - t0:.0f} s")
    fit.save(dest)
    marker.write_text(digest + "\n")  # the fit is valid for this version of its input only
    _save_stage(run_dir, "fit_unmixer", {
        "path": str(dest), "source": str(scene_zarr), "n_endmembers": len(fit.names),
        "names": [str(n) for n in fit.names], "provenance": getattr(fit, "provenance", {}),
        "wall_s": time.perf_counter() - t0,
    })
    return dest


def stage_unmix(
    tile_store: str | Path, fit_dir: str | Path, run_dir: str | Path, config: RunConfig, *,
    executor: Executor | None = None, progress: StageProgress | None = None, submit: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Apply the fitted unmixer to every tile (abundances + per-pixel RMSE)."""
    from workers.infer import UnmixTileModel

    m = UnmixTileModel.from_fit(fit_dir, config.device)
    return _model_stage("unmix", m, Path(tile_store), Path(run_dir), config, executor, progress, submit)


def _tiles_digest(summary: dict[str, Any]) -> str:
    recs = tstore.load_records(summary["path"])
    blob = json.dumps(sorted((k, r.get("checksum"), r.get("status")) for k, r in recs.items()))
    import hashlib

    return hashlib.sha256(blob.encode()).hexdigest()


def stage_blend(
    stage: str, run_dir: str | Path, config: RunConfig, *, executor: Executor | None = None,
    progress: StageProgress | None = None,
) -> Path:
    """Blend a model stage's tiles into its output zarr (``denoised.zarr`` or ``abundances.zarr``)."""
    from pipeline.ingest import open_zarr_scene

    run_dir = Path(run_dir)
    summary = load_stage(run_dir, stage)
    if summary is None:
        raise ProvenanceError(f"stage {stage!r} has not run in {str(run_dir)!r}; run it before blending")
    like = open_zarr_scene(run_dir / INGESTED)
    grid = tstore.open_grid(summary["source"])
    digest = _tiles_digest(summary)
    out_key = "denoised_zarr" if stage == "denoise" else "abundances_zarr"
    dest = confined_path(run_dir, OUT_NAMES[out_key])
    if dest.exists():
        import zarr

        a = dict(zarr.open_group(str(dest), mode="r").attrs)
        if a.get("hyperdeq_complete") and a.get("tiles_digest") == digest and not summary["failed"]:
            return dest
        shutil.rmtree(dest)
    t0 = time.perf_counter()
    attrs = {"model": summary["model"], "weights_sha256": summary["weights_sha256"], "blend": config.blend,
             "tile": config.tile, "halo": config.halo}
    channels = summary["channels"]
    if stage == "denoise":
        band_index = tstore.store_attrs(summary["source"])["band_index"]
        arrays = create_output_zarr(
            dest, "denoised", like, channel_dim="band", chunk=config.chunk, attrs=attrs,
            channel_coords={k: like[k].values for k in ("band", "wavelength", "fwhm", "good_band")},
        )
        targets = [BlendTarget(arrays["denoised"], tuple(range(len(channels))), tuple(int(b) for b in band_index))]
    else:
        names = channels[:-1]
        arrays = create_output_zarr(
            dest, "abundances", like, channel_dim="endmember", chunk=config.chunk, attrs=attrs,
            channel_coords={"endmember": np.asarray(names, dtype=object)}, extra=[("rmse", None, None)],
        )
        targets = [
            BlendTarget(arrays["abundances"], tuple(range(len(names))), tuple(range(len(names)))),
            BlendTarget(arrays["rmse"], (len(names),), ()),
        ]
    recs = tstore.load_records(summary["path"])
    ok_keys = {k for k, r in recs.items() if r.get("status") == "ok"}
    # every tile is checked against the sha256 recorded when it was written, as it is read for blending
    checksums = {k: recs[k].get("checksum") for k in ok_keys}
    cb = (lambda d, t: progress(f"blend_{stage}", d, t)) if progress else None
    # DECSC's band guard: one weight per band for the whole scene (the tiles' own weights averaged
    # by valid pixels), applied as the tiles are blended: out + w (input − out)
    mix = None
    guard_rec: dict[str, Any] = {}
    if stage == "denoise":
        from workers.denoise.guard import scene_weights
        from workers.denoise.spec import GUARD_WEIGHTS_FILE, GUARD_WEIGHTS_SHA256

        mix = scene_weights(recs[k].get("stats") for k in sorted(ok_keys))
        if mix is not None:
            guard_rec = {"band_guard": {"file": GUARD_WEIGHTS_FILE, "sha256": GUARD_WEIGHTS_SHA256,
                                        "scope": "scene (tile weights averaged by valid pixels)",
                                        "w": [round(float(v), 6) for v in mix]}}
    with _executor_for(executor, config) as ex:
        blend_stage(ex, summary["path"], summary["source"], grid, targets, chunk=config.chunk,
                    blend=config.blend, ok_keys=ok_keys, progress=cb, checksums=checksums,
                    mix=None if mix is None else mix.tolist())
    mark_complete(dest, tiles_digest=digest, failed_tiles=summary["failed"])
    _save_stage(run_dir, f"blend_{stage}", {"path": str(dest), "wall_s": time.perf_counter() - t0, **guard_rec})
    return dest


@contextmanager
def _atomic_output(dest: Path) -> Iterator[Path]:
    """A temporary path beside ``dest`` (same suffix) renamed to ``dest`` only when the body succeeds.

    ``stage_write`` skips outputs that exist, so a half-written file must never carry the final name.
    """
    for stale in dest.parent.glob(f".{dest.stem}.*.tmp{dest.suffix}"):  # left by a killed run
        stale.unlink(missing_ok=True)
    tmp = dest.with_name(f".{dest.stem}.{os.getpid()}.tmp{dest.suffix}")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def stage_write(run_dir: str | Path, config: RunConfig) -> dict[str, str]:
    """COGs, quicklooks and endmember tables from the blended zarr outputs; returns ``{key: relative path}``."""
    from pipeline.ingest import open_zarr_scene

    run_dir = Path(run_dir)
    like = open_zarr_scene(run_dir / INGESTED)
    outputs: dict[str, str] = {}
    t0 = time.perf_counter()

    def target(key: str) -> Path:
        p = confined_path(run_dir, OUT_NAMES[key])
        outputs[key] = OUT_NAMES[key]
        return p

    tags = {"hyperdeq_run": run_dir.name}
    if config.denoise:
        z = run_dir / OUT_NAMES["denoised_zarr"]
        outputs["denoised_zarr"] = OUT_NAMES["denoised_zarr"]
        wl = like["wavelength"].values
        good = like["good_band"].values.astype(bool)
        tif = target("denoised_tif")
        if not tif.exists():
            with _atomic_output(tif) as tmp:
                write_cog(z / "denoised", tmp, like, descriptions=[f"{w:.3f} nm" for w in wl],
                          band_tags=[{"wavelength": w, "fwhm": f, "good_band": int(g)} for w, f, g in
                                     zip(wl, like["fwhm"].values, good, strict=True)], tags=tags)
        png = target("quicklook_rgb")
        if not png.exists():
            with _atomic_output(png) as tmp:
                quicklook_rgb(z / "denoised", rgb_bands(wl, good), tmp)
    if config.unmix:
        z = run_dir / OUT_NAMES["abundances_zarr"]
        outputs["abundances_zarr"] = OUT_NAMES["abundances_zarr"]
        names = [str(n) for n in open_output(z, "abundances")["endmember"].values]
        for key, var, desc in (("abundances_tif", "abundances", names), ("rmse_tif", "rmse", ["rmse"])):
            tif = target(key)
            if not tif.exists():
                with _atomic_output(tif) as tmp:
                    write_cog(z / var, tmp, like, descriptions=desc, tags=tags)
        png = target("quicklook_abundances")
        if not png.exists():
            with _atomic_output(png) as tmp:
                quicklook_abundances(z / "abundances", tmp)
        csv, js = target("endmembers_csv"), target("endmembers_json")
        if not (csv.exists() and js.exists()):
            from workers.infer import load_fit
            from workers.unmix.fit import write_endmembers

            csv.unlink(missing_ok=True)
            js.unlink(missing_ok=True)
            with _atomic_output(csv) as tmp_csv, _atomic_output(js) as tmp_js:
                write_endmembers(load_fit(str(run_dir / FIT_DIR)), tmp_csv, tmp_js)
        if not config.denoise:
            png = target("quicklook_rgb")
            if not png.exists():
                with _atomic_output(png) as tmp:
                    quicklook_rgb(run_dir / INGESTED / _scene_var(run_dir / INGESTED),
                                  rgb_bands(like["wavelength"].values, like["good_band"].values.astype(bool)), tmp)
    _save_stage(run_dir, "write", {"outputs": outputs, "wall_s": time.perf_counter() - t0})
    return outputs


def _scene_var(store: Path) -> str:
    import zarr

    g = zarr.open_group(str(store), mode="r")
    names = [k for k, a in g.arrays() if a.ndim == 3]
    if not names:
        raise ProvenanceError(f"no 3-D array in {str(store)!r}; the ingested scene is damaged, rerun")
    return names[0]


def _gpu_name() -> str | None:
    """The local GPU's name; only asked when torch is already loaded (importing it costs seconds)."""
    if "torch" not in sys.modules:
        return None
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def stage_record(
    run_dir: str | Path, plan: dict[str, Any], *, outputs: dict[str, str], start: str,
    cluster: dict[str, Any] | None = None,
) -> Path:
    """Write ``run.json`` (complete only when no tile failed), copy it into the zarr attrs, write the STAC Item."""
    import zarr

    from pipeline.ingest import open_zarr_scene

    run_dir = Path(run_dir)
    cfg: RunConfig = plan["config"]
    stages = {}
    tiles: dict[str, list[dict[str, Any]]] = {}
    failed: list[str] = []
    not_conv: list[str] = []
    models = []
    for stage in ("denoise", "unmix"):
        s = load_stage(run_dir, stage)
        if s is None:
            continue
        stages[stage] = s
        recs = tstore.load_records(s["path"])
        tiles[stage] = [
            {**{k: r.get(k) for k in ("key", "index", "status", "worker", "device", "wall_s", "iterations",
                                      "residual", "converged", "checksum", "error")},
             # DECSC's band guard: this tile's own weights (mean, max, bands with w > 0.5); the
             # scene-wide per-band weights applied at blending are in models[].band_guard; its
             # spectral-subspace pass: k, pixels kept outside, impulse pixels and lines cleaned
             **{k: v for k, v in (r.get("stats") or {}).items()
                if (k.startswith("guard") and k != "guard_w") or k.startswith("subspace")}}
            for _, r in sorted(recs.items())
        ]
        failed += [f"{stage}:{k}" for k in s["failed"]]
        not_conv += [f"{stage}:{k}" for k in s["not_converged"]]
        models.append({"name": s["model"], "weights_sha256": s["weights_sha256"] if stage == "denoise"
                       else plan["weights"].get("deq-unmix"), "halo": s["halo"], "stage": stage,
                       **({"fit_sha256": s["weights_sha256"]} if stage == "unmix" else {})})
    for extra in ("ingest", "tile_input", "fit_unmixer", "tile_unmix_input", "blend_denoise", "blend_unmix", "write"):
        s = load_stage(run_dir, extra)
        if s is not None:
            stages[extra] = s
    for m in models:  # the guard weights applied when the denoised tiles were blended
        if m["stage"] == "denoise":
            m.update(_band_guard_record(stages.get("blend_denoise")))
    status = prov.COMPLETE if not failed and outputs else prov.FAILED
    record = {
        "run_id": plan["run_id"], "status": status, "start": start, "end": prov.now(),
        "input": plan["input"], "config": cfg.to_dict(), "config_hash": plan["config_hash"],
        "models": models, "packages": prov.package_versions(), "code_version": prov.code_version(),
        "host": prov.host_info(_gpu_name()), "cluster": cluster or {}, "outputs": outputs,
        "failed_tiles": failed, "not_converged_tiles": not_conv, "tiles": tiles,
        "stages": {k: {kk: vv for kk, vv in v.items() if kk not in ("failed", "not_converged")} for k, v in stages.items()},
    }
    like = open_zarr_scene(run_dir / INGESTED)
    geo = geo_attrs(like)
    bbox = geometry = None
    if like.rio.crs is not None:
        try:
            from rasterio.warp import transform_bounds

            b = transform_bounds(like.rio.crs, "EPSG:4326", *like.rio.bounds())
            bbox = [float(v) for v in b]
            geometry = {"type": "Polygon", "coordinates": [[[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]], [b[0], b[1]]]]}
        except Exception:
            pass
    for key in ("denoised_zarr", "abundances_zarr"):
        if key in outputs:
            g = zarr.open_group(str(run_dir / outputs[key]), mode="r+")
            g.attrs["hyperdeq_run"] = json.loads(json.dumps(
                {k: v for k, v in record.items() if k != "tiles"}, default=str))
    prov.write_stac_item(run_dir, prov.stac_item(record, geo, bbox, geometry))
    return prov.write_run_record(run_dir, record)  # last: the commit marker


# ---------------------------------------------------------------------------- composition
#: errno values that can only come from writing (disk or quota full, file too large, read-only)
_WRITE_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EFBIG", "EDQUOT", "EROFS") if hasattr(errno, n))
#: what each stage of run_scene writes, relative to the run directory (named when an OSError has no filename)
_STAGE_WHERE = {
    "ingest": INGESTED, "tile": TILES_INPUT, "denoise": "tiles/denoise.zarr",
    "blend (denoised)": OUT_NAMES["denoised_zarr"], "fit unmixer": FIT_DIR,
    "tile (unmix input)": TILES_UNMIX_INPUT, "unmix": "tiles/unmix.zarr",
    "blend (abundances)": OUT_NAMES["abundances_zarr"], "write outputs": ".", "run record": prov.RUN_JSON,
}


def _fail_run(
    run_dir: Path, running: dict[str, Any], stage: str, exc: BaseException, client: Any = None,
    scheduler: str | None = None,
) -> BaseException:
    """Mark the run failed in ``run.json`` and return the exception :func:`run_scene` raises.

    HyperdeqErrors (and non-``Exception`` interrupts) come back unchanged; a lost scheduler becomes
    :class:`ClusterError`, an ``OSError`` :class:`WriteError` saying what failed, where, and what to do.
    """
    out: BaseException = exc
    if isinstance(exc, HyperdeqError) or not isinstance(exc, Exception):
        pass
    elif _is_cluster_loss(exc) or _client_lost(client) or (
            client is not None and isinstance(exc, ConnectionError | TimeoutError)):
        out = _cluster_lost_error(stage, _scheduler_address(client, scheduler), f"{type(exc).__name__}: {exc}"[:300])
    elif isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError):
        where = exc.filename or (run_dir / _STAGE_WHERE.get(stage, "."))
        why = exc.strerror or str(exc) or type(exc).__name__
        code = f"[Errno {exc.errno}] " if exc.errno else ""
        verb = "could not write" if exc.errno in _WRITE_ERRNOS else "failed on"
        out = WriteError(
            f"{code}{why}: the {stage} stage {verb} {str(where)!r}; check free space / permissions "
            "there, then rerun the same command to resume"
        )
        if exc.errno is not None:
            out.errno = exc.errno
    err = f"{type(out).__name__}: {out}"
    record = {**running, "status": prov.FAILED, "end": prov.now(), "failed_stage": stage,
              "error": err[:1500], "outputs": {}}
    try:
        prov.write_run_record(run_dir, record)
    except Exception as wexc:  # a full disk may refuse even this small file; the record then stays 'running'
        out.add_note(f"(could not mark {str(run_dir / prov.RUN_JSON)!r} failed either: {wexc})")
    return out


def run_scene(
    scene_path: str | Path,
    out_dir: str | Path | None = None,
    config: RunConfig | None = None,
    client: Any = None,
    progress: StageProgress | None = None,
    *,
    denoise_model: TileModel | None = None,
) -> RunResult:
    """Run every stage on one scene; resume or reuse a previous identical run.

    ``client``: a ``distributed.Client``, a :class:`workers.cluster.ClusterHandle`, any
    ``concurrent.futures.Executor`` (everything runs through it), or None (a LocalCluster of
    ``config.workers`` processes, or a connection to ``config.scheduler`` when set).
    ``denoise_model`` replaces DECSC (e.g. the identity model in tests).
    """
    config = config or RunConfig()
    out_root = Path(out_dir) if out_dir is not None else config.out_root
    plan = plan_run(scene_path, out_root, config, denoise_model)
    cfg: RunConfig = plan["config"]
    run_dir = Path(plan["run_dir"])
    done = prov.find_completed_run(run_dir.parent, plan["input"]["sha256"], plan["config_hash"], plan["weights"])
    if done is not None:
        rec = prov.load_run_record(done)
        return RunResult(rec["run_id"], done, rec["status"], {k: done / v for k, v in rec["outputs"].items()},
                         rec["failed_tiles"], rec["not_converged_tiles"], reused=True,
                         n_tiles=len(next(iter(rec["tiles"].values()), [])))
    run_dir.mkdir(parents=True, exist_ok=True)
    start = prov.now()
    running = {"run_id": plan["run_id"], "status": prov.RUNNING, "start": start,
               "input": plan["input"], "config_hash": plan["config_hash"]}
    prov.write_run_record(run_dir, running)

    owned = None
    dist_client: Any = None  # the distributed.Client, when running on Dask
    cluster_desc: dict[str, Any] = {}
    model_ex: Executor
    any_ex: Executor
    if isinstance(client, Executor):
        model_ex = any_ex = client
        cluster_desc = {"executor": type(client).__name__}
    else:
        from workers.cluster import ClusterHandle, get_cluster, has_gpu_workers

        if client is None:
            preload = ("decsc",) if cfg.denoise and denoise_model is None else ()
            owned = handle = get_cluster(cfg.workers, cfg.scheduler, device=cfg.device, preload=preload,
                                         decsc_arch=cfg.denoise_arch)
        elif isinstance(client, ClusterHandle):
            handle = client
        else:
            handle = ClusterHandle(client=client, gpu=has_gpu_workers(client))
        model_ex, any_ex = handle.model_executor(), handle.executor()
        dist_client = handle.client
        cluster_desc = handle.describe()
    current = "ingest"
    try:
        ingested = stage_ingest(scene_path, run_dir, cfg)
        current = "tile"
        tile_store = stage_tile(ingested, run_dir, cfg)
        n_tiles = len(tstore.open_grid(tile_store).tiles)
        unmix_source = ingested
        unmix_tiles = tile_store
        if cfg.denoise:
            current = "denoise"
            stage_denoise(tile_store, run_dir, cfg, executor=model_ex, progress=progress, model=denoise_model)
            current = "blend (denoised)"
            unmix_source = stage_blend("denoise", run_dir, cfg, executor=any_ex, progress=progress)
        if cfg.unmix:
            current = "fit unmixer"
            fit_dir = stage_fit_unmixer(unmix_source, run_dir, cfg)
            if cfg.denoise:
                current = "tile (unmix input)"
                unmix_tiles = stage_tile(unmix_source, run_dir, cfg, name="unmix_input")
            current = "unmix"
            stage_unmix(unmix_tiles, fit_dir, run_dir, cfg, executor=model_ex, progress=progress)
            current = "blend (abundances)"
            stage_blend("unmix", run_dir, cfg, executor=any_ex, progress=progress)
        current = "write outputs"
        outputs = stage_write(run_dir, cfg)
        current = "run record"
        rec_path = stage_record(run_dir, plan, outputs=outputs, start=start, cluster=cluster_desc)
    except BaseException as exc:
        err = _fail_run(run_dir, running, current, exc, dist_client, cluster_desc.get("scheduler"))
        if err is exc:
            raise
        raise err from exc
    finally:
        if owned is not None:
            owned.close()
    rec = json.loads(rec_path.read_text())
    if rec["status"] != prov.COMPLETE and not rec["failed_tiles"]:
        raise ModelError(f"run {plan['run_id']!r} ended with status {rec['status']!r}; see {str(rec_path)!r}")
    return RunResult(plan["run_id"], run_dir, rec["status"], {k: run_dir / v for k, v in outputs.items()},
                     rec["failed_tiles"], rec["not_converged_tiles"], reused=False, n_tiles=n_tiles)
