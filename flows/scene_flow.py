"""``process_scene``: one scene through every stage, as a Prefect flow.

Prefect per scene, Dask per tile batch: each Prefect task is one stage (one library call from
:mod:`workers.run`) and the tile batches of a stage go to a ``distributed`` cluster obtained from
:mod:`workers.cluster`, opened once per flow run and shared by every stage (see
``docs/prefect.md`` for why this, rather than prefect-dask's ``DaskTaskRunner``).

Resuming: a run is named by ``run_id = f(input sha256, config hash, weights sha256s)``. Each
task's cache key is ``<stage>-<run_id>`` (never the flow-run id) and its result is persisted in
the run directory (``_prefect/``), so a restarted flow skips the stages that finished; within a
stage the library skips tiles whose records are complete. Deleting the run directory deletes the
cache with it.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem
from prefect.utilities.annotations import quote

from flows.artifacts import (
    SceneSummary,
    publish_scene_artifacts,
    scene_progress,
    summary_from_record,
    write_quicklooks,
)
from flows.settings import ClusterOptions, RunOptions, SceneParams
from pipeline.errors import ModelError

PREFECT_DIR = "_prefect"  # persisted task results, inside the run directory


def _stage_key(stage: str):
    """Cache key function: stage name + run id (input sha256, config hash, weights sha256s)."""

    def key(_ctx: TaskRunContext, params: dict[str, Any]) -> str:
        return f"hyperdeq-{stage}-{params['plan']['run_id']}"

    return key


def _stage_task(stage: str, fn: Any) -> Any:
    return task(
        fn,
        name=stage,
        task_run_name="{label}",
        cache_key_fn=_stage_key(stage),
        persist_result=True,
        retries=0,
    )


# ------------------------------------------------------------------------------------- tasks
@task(name="plan", task_run_name="plan {scene_name}", cache_policy=NO_CACHE)
def plan_task(scene: str, out_dir: str, config: Any, scene_name: str) -> dict[str, Any]:
    """Hash the input, resolve halos, name the run directory (no data processed)."""
    from workers.run import plan_run

    return plan_run(scene, out_dir, config)


@task(name="find-completed", task_run_name="look for a completed run of {scene_name}",
      cache_policy=NO_CACHE)
def find_completed_task(plan: dict[str, Any], scene_name: str) -> str | None:
    from pipeline.provenance import find_completed_run

    run_dir = Path(plan["run_dir"])
    done = find_completed_run(run_dir.parent, plan["input"]["sha256"], plan["config_hash"], plan["weights"])
    return None if done is None else str(done)


@task(name="start-record", task_run_name="start record {label}", cache_policy=NO_CACHE)
def start_record_task(plan: dict[str, Any], label: str) -> str:
    """Write the ``running`` record first (the run is complete only when the last record says so)."""
    from pipeline import provenance as prov

    run_dir = Path(plan["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    start = prov.now()
    prov.write_run_record(run_dir, {"run_id": plan["run_id"], "status": prov.RUNNING, "start": start,
                                    "input": plan["input"], "config_hash": plan["config_hash"]})
    return start


def _ingest(scene: str, plan: dict[str, Any], label: str) -> Path:
    from workers.run import stage_ingest

    return stage_ingest(scene, plan["run_dir"], plan["config"])


def _tile(scene_zarr: Path, plan: dict[str, Any], label: str, name: str = "input") -> Path:
    from workers.run import stage_tile

    return stage_tile(scene_zarr, plan["run_dir"], plan["config"], name=name)


def _denoise(tile_store: Path, plan: dict[str, Any], label: str, executor: Executor, progress: Any) -> dict:
    from workers.run import stage_denoise

    return stage_denoise(tile_store, plan["run_dir"], plan["config"], executor=executor, progress=progress)


def _blend(stage: str, plan: dict[str, Any], label: str, executor: Executor, progress: Any) -> Path:
    from workers.run import stage_blend

    return stage_blend(stage, plan["run_dir"], plan["config"], executor=executor, progress=progress)


def _fit(scene_zarr: Path, plan: dict[str, Any], label: str) -> Path:
    from workers.run import stage_fit_unmixer

    logger = get_run_logger()
    return stage_fit_unmixer(scene_zarr, plan["run_dir"], plan["config"], log=logger.info)


def _unmix(tile_store: Path, fit_dir: Path, plan: dict[str, Any], label: str, executor: Executor,
           progress: Any) -> dict:
    from workers.run import stage_unmix

    return stage_unmix(tile_store, fit_dir, plan["run_dir"], plan["config"], executor=executor, progress=progress)


def _write(plan: dict[str, Any], label: str) -> dict[str, str]:
    from workers.run import stage_write

    return stage_write(plan["run_dir"], plan["config"])


ingest_task = _stage_task("ingest", _ingest)
tile_task = _stage_task("tile", _tile)
tile_unmix_task = _stage_task("tile-unmix-input", _tile)
denoise_task = _stage_task("denoise", _denoise)
blend_denoise_task = _stage_task("blend-denoise", _blend)
blend_unmix_task = _stage_task("blend-unmix", _blend)
fit_task = _stage_task("fit-unmixer", _fit)
unmix_task = _stage_task("unmix", _unmix)
write_task = _stage_task("write", _write)


@task(name="record", task_run_name="{label}", cache_policy=NO_CACHE)
def record_task(plan: dict[str, Any], outputs: dict[str, str], start: str, cluster: dict[str, Any],
                label: str) -> str:
    """Write ``run.json`` (last: the commit marker) and the STAC Item."""
    from workers.run import stage_record

    return str(stage_record(plan["run_dir"], plan, outputs=outputs, start=start, cluster=cluster))


@task(name="artifacts", task_run_name="{label}", cache_policy=NO_CACHE)
def artifacts_task(run_dir: str, label: str, reused: bool = False) -> dict[str, Any]:
    """Run report, quality table and quicklooks from the run record (monitoring only)."""
    from flows.artifacts import render_quicklooks

    summary: SceneSummary = summary_from_record(run_dir, reused=reused)
    looks = write_quicklooks(run_dir, render_quicklooks(run_dir))
    return {k: str(v) for k, v in publish_scene_artifacts(summary, looks).items()}


# ------------------------------------------------------------------------------------- cluster
def open_cluster(cluster: ClusterOptions, config: Any) -> Any:
    """A :class:`workers.cluster.ClusterHandle` for this run (owned unless kind='address')."""
    from distributed import Client, LocalCluster

    from workers.cluster import GPU, ClusterHandle, get_cluster, has_gpu_workers

    preload = ("decsc",) if config.denoise else ()
    if cluster.kind == "address":
        return get_cluster(scheduler=cluster.address, device=config.device, preload=preload,
                           decsc_arch=config.denoise_arch)
    kw = cluster.cluster_kwargs()
    if cluster.kind == "cuda":
        from dask_cuda import LocalCUDACluster

        kw.pop("n_workers", None)  # one worker per visible GPU
        kw.setdefault("resources", {GPU: 1})
        kw = {k: v for k, v in kw.items() if v is not None}
        c = LocalCUDACluster(**kw)
    else:
        kw.setdefault("dashboard_address", ":0")  # a free port; never clash with 8787
        c = LocalCluster(**kw)
    client = Client(c, set_as_default=False)  # never the process-wide default: see workers.cluster
    handle = ClusterHandle(client=client, cluster=c, gpu=has_gpu_workers(client))
    if preload:
        from workers.plugin import ModelPlugin, local_torch_threads

        threads = 1
        if cluster.kind != "cuda":
            nw = len(client.scheduler_info().get("workers", {})) or int(kw.get("n_workers") or 1)
            threads = local_torch_threads(nw, int(kw.get("threads_per_worker") or 1))
        client.register_plugin(ModelPlugin(models=preload, device=config.device, torch_threads=threads,
                                           decsc_arch=config.denoise_arch), name=ModelPlugin.name)
    return handle


def _dashboard(client: Any) -> str:
    try:
        return str(client.dashboard_link)
    except Exception:  # no dashboard on that scheduler
        return "none"


# ------------------------------------------------------------------------------------- flow
@flow(
    name="process-scene",
    flow_run_name="{scene}",
    description="Denoise (DECSC) and unmix (DEQ-Unmix) one hyperspectral scene, tile batches on Dask.",
    log_prints=True,
    validate_parameters=True,
)
def process_scene(
    scene: str,
    out_dir: str = "hyperdeq-out",
    options: RunOptions = RunOptions(),
    cluster: ClusterOptions = ClusterOptions(),
) -> str:
    """Run ingest → tile → denoise → unmix (fit, apply) → blend → write → run record on ``scene``.

    Returns the path of the run record (``run.json``). Raises when tiles failed (after the record
    and the report are written, so the failure is documented).
    """
    log = get_run_logger()
    params = SceneParams(scene=scene, out_dir=out_dir, options=options, cluster=cluster)
    cfg = params.options.to_run_config(params.out_dir, params.cluster)
    name = Path(params.scene).name
    plan = plan_task(params.scene, params.out_dir, cfg, scene_name=name)
    run_dir = Path(plan["run_dir"])
    log.info("scene %s: run %s in %s (config %s)", name, plan["run_id"], run_dir, plan["config_hash"][:12])

    done = find_completed_task(plan, scene_name=name)
    if done is not None:
        log.info("scene %s already has a complete run with this configuration and weights: %s", name, done)
        artifacts_task(done, label=f"report {name} (reused)", reused=True)
        return str(Path(done) / "run.json")

    # results live in the run directory; Prefect 3 wants result storage saved server-side
    storage = LocalFileSystem(basepath=str(run_dir / PREFECT_DIR))
    storage.save(f"hyperdeq-results-{plan['run_id']}", overwrite=True)

    def _t(t: Any) -> Any:
        return t.with_options(result_storage=storage)

    cfg = plan["config"]
    stages = ["ingest", "tile"]
    if cfg.denoise:
        stages += ["denoise", "blend_denoise"]
    if cfg.unmix:
        stages += ["fit_unmixer"] + (["tile_unmix_input"] if cfg.denoise else []) + ["unmix", "blend_unmix"]
    stages += ["write", "record"]
    progress = scene_progress(name, stages, logger=log)

    start = start_record_task(plan, label=name)
    t0 = time.perf_counter()
    handle = open_cluster(params.cluster, cfg)
    current = "cluster"
    try:
        desc = handle.describe()
        log.info("tile batches run on %s (%d workers, GPU workers: %s); Dask dashboard: %s",
                 desc.get("scheduler"), desc.get("n_workers", 0), desc.get("gpu_workers") or "none",
                 _dashboard(handle.client))
        model_ex, any_ex = quote(handle.model_executor()), quote(handle.executor())
        current = "ingest"
        ingested = _t(ingest_task)(params.scene, plan, label=f"ingest {name}")
        progress.stage_done("ingest")
        current = "tile"
        tiles = _t(tile_task)(ingested, plan, label=f"tile {name}")
        from pipeline.tiles import open_grid

        n_tiles = len(open_grid(tiles).tiles)
        rng = f"tiles 0-{max(n_tiles - 1, 0)} ({n_tiles}, batches of {cfg.batch_size})"
        progress.stage_done("tile")
        unmix_source, unmix_tiles = ingested, tiles
        if cfg.denoise:
            current = "denoise"
            s = _t(denoise_task)(tiles, plan, label=f"denoise {name} {rng}", executor=model_ex,
                                 progress=quote(progress))
            log.info("denoise %s: %d/%d tiles ok, %d not converged, %d failed", name, s["n_ok"],
                     s["n_tiles"], len(s["not_converged"]), len(s["failed"]))
            current = "blend (denoised)"
            unmix_source = _t(blend_denoise_task)("denoise", plan, label=f"blend denoised {name}",
                                                  executor=any_ex, progress=quote(progress))
        if cfg.unmix:
            current = "fit unmixer"
            fit_dir = _t(fit_task)(unmix_source, plan, label=f"fit unmixer {name}")
            progress.stage_done("fit_unmixer")
            if cfg.denoise:
                current = "tile (unmix input)"
                unmix_tiles = _t(tile_unmix_task)(unmix_source, plan, label=f"tile denoised {name}",
                                                  name="unmix_input")
                progress.stage_done("tile_unmix_input")
            current = "unmix"
            s = _t(unmix_task)(unmix_tiles, fit_dir, plan, label=f"unmix {name} {rng}",
                               executor=model_ex, progress=quote(progress))
            log.info("unmix %s: %d/%d tiles ok, %d failed", name, s["n_ok"], s["n_tiles"], len(s["failed"]))
            current = "blend (abundances)"
            _t(blend_unmix_task)("unmix", plan, label=f"blend abundances {name}", executor=any_ex,
                                 progress=quote(progress))
        current = "write outputs"
        outputs = _t(write_task)(plan, label=f"write {name}")
        progress.stage_done("write")
        current = "run record"
        record = record_task(plan, outputs, start, desc, label=f"run record {name}")
        progress.stage_done("record")
    except Exception as exc:
        # the record says 'failed' with the stage and the error (never 'running' after a crash);
        # a lost scheduler becomes ClusterError, an OSError a WriteError saying where and what to do
        from workers.run import _fail_run

        running = {"run_id": plan["run_id"], "status": "running", "start": start,
                   "input": plan["input"], "config_hash": plan["config_hash"]}
        err = _fail_run(run_dir, running, current, exc, client=getattr(handle, "client", None))
        log.error("scene %s failed in stage %s: %s", name, current, err)
        if err is exc:
            raise
        raise err from exc
    finally:
        handle.close()  # closes the client, and the cluster when this run started it
    log.info("scene %s processed in %.1f s; run record %s", name, time.perf_counter() - t0, record)
    artifacts_task(str(run_dir), label=f"report {name}")
    import json

    rec = json.loads(Path(record).read_text())
    if rec["status"] != "complete":
        raise ModelError(
            f"run {rec['run_id']!r} of {name!r} ended {rec['status']!r} with "
            f"{len(rec['failed_tiles'])} failed tiles ({rec['failed_tiles'][:5]!r}); see {record!r}. "
            "Fix the cause and rerun: completed tiles are reused."
        )
    return record


logging.getLogger("hyperdeq").setLevel(logging.INFO)
