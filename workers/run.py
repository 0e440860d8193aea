"""A run: its job (configuration + model options), its plan, and the one stage sequence.

:func:`sequence` is the only place the stages are ordered; :func:`execute` runs it for
``hyperdeq run`` (``call`` = a plain call) and for the Prefect flow (``call`` wraps each stage as a
task and adds nothing else). Around the sequence, :func:`execute` finds a completed identical run
(verifying its outputs), takes the run folder's lock, writes the ``running`` record, opens the
cluster, and on any error or signal ends the record (``failed`` with the stage and the error, or
``cancelled``) before re-raising. Nothing is marked complete on that path and finished tiles stay
committed, so the same command resumes.

A run lives in ``out_root/<scene>/<run_id>/``; the run id is derived from the input's sha256, the
configuration hash and the model weights' sha256s.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import provenance as prov
from pipeline.config import AUTO_TILES, DEFAULT_TILE, RunConfig
from pipeline.errors import ConfigError, HyperdeqError, ModelError, WriteError
from pipeline.hashing import sha256_path
from pipeline.runner import TileModel
from pipeline.writers import confined_path, safe_name
from workers.cluster import ClusterHandle, ClusterSpec, has_gpu_workers, open_cluster
from workers.plan import Job, RunPlan, config_hash
from workers.stages import (
    FIT_DIR,
    INGESTED,
    LOST_NAMES,
    OUT_NAMES,
    STAGING,
    TILES_INPUT,
    TILES_UNMIX_INPUT,
    StageEnv,
    StageProgress,
    client_lost,
    cluster_lost_error,
    load_stage,
    scheduler_address,
    stage_blend,
    stage_fit_unmixer,
    stage_ingest,
    stage_model,
    stage_record,
    stage_tile,
    stage_write,
)

__all__ = [
    "INGESTED",
    "OUT_NAMES",
    "Job",
    "RunPlan",
    "RunResult",
    "RunCancelled",
    "execute",
    "load_stage",
    "plan_run",
    "run_scene",
    "sequence",
    "stage_names",
]

_log = logging.getLogger("hyperdeq.run")
CANCELLED = "cancelled"
LOCK = ".hyperdeq.lock"


class RunCancelled(BaseException):
    """The run was stopped by a signal or a cancellation (not an error of the run itself)."""

    def __init__(self, why: str, exit_code: int = 130) -> None:
        super().__init__(why)
        self.exit_code = exit_code


def _choose_tile(job: Job, n_bands: int, hw: tuple[int, int]) -> RunConfig:
    """The largest automatic tile whose tiles fit the memory budget (the explicit tile otherwise)."""
    cfg = job.config
    if cfg.tile is not None:
        return cfg
    halo = int(cfg.halo or 0)
    for t in AUTO_TILES:
        if t <= halo:
            break
        cand = cfg.replace(tile=t)
        rows, cols = cand.read_window(hw)
        try:
            cand.check_tile_memory(n_bands, job.model_parts(rows, cols, n_bands), hw)
            return cand
        except ConfigError:
            continue
    return cfg.replace(
        tile=DEFAULT_TILE
    )  # refused with the clear message by the check that follows


def _scene_header(scene: Path) -> dict[str, Any]:
    """Bands, size and valid bands of the scene, read from its header (no pixels): refuses bad input early."""
    from pipeline.readers import open_scene
    from pipeline.scene import check_tileable, good_band_index

    da = open_scene(scene)
    check_tileable(
        da.shape, scene
    )  # a 1-row or 1-pixel scene: refused here, not after the cluster starts
    good = good_band_index(da)
    return {
        "bands": int(da.shape[0]),
        "good_bands": len(good),
        "rows": int(da.shape[1]),
        "cols": int(da.shape[2]),
    }


def _check_scene_options(job: Job, scene: Path, info: dict[str, Any]) -> None:
    n = job.unmix.endmembers if job.unmix is not None else None
    if n is not None and n >= info["good_bands"]:
        raise ConfigError(
            f"--endmembers {n!r} is not below the scene's {info['good_bands']!r} good bands ({str(scene)!r}); "
            "unmixing needs fewer endmembers than bands: lower --endmembers or leave it unset to estimate it"
        )


def _check_out_root(out_root: Path) -> None:
    """Refuse an output root that cannot hold a run, before any work."""
    p = out_root.expanduser()
    probe_dir = p
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if probe_dir.exists() and not probe_dir.is_dir():
        raise ConfigError(
            f"output folder {str(p)!r} is under {str(probe_dir)!r}, which is a file; choose a folder"
        )
    if p.resolve().parts[1:2] in (("proc",), ("sys",), ("dev",)):  # not /device-data, /system, ...
        raise ConfigError(
            f"output folder {str(p)!r} is on a system file system; choose a folder on a disk"
        )
    if not os.access(probe_dir, os.W_OK):
        raise ConfigError(
            f"output folder {str(p)!r} is not writable ({str(probe_dir)!r} refuses writes); "
            "choose a writable folder or fix its permissions"
        )


def _check_device(device: str) -> None:
    if not device.startswith("cuda"):
        return
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    idx = int(device.split(":")[1]) if ":" in device else 0
    if idx >= n:
        raise ConfigError(
            f"--device {device!r} was asked for but this host has {n} CUDA device(s); "
            "use --device cpu (or auto), or run on a GPU host"
        )


@dataclass(frozen=True)
class Preflight:
    """What :func:`preflight` resolved: the job with its tile and halo, the models' halos, the header."""

    job: Job
    halos: dict[str, int]
    info: dict[str, Any]


def preflight(
    scene: str | Path,
    job: Job,
    *,
    tile_models: dict[str, TileModel] | None = None,
    header: bool = True,
) -> Preflight:
    """Every check a run needs before any work, without hashing the input: the scene exists and its
    header reads, the options fit it, the output folder and device are usable, and a tile fits the
    memory budget (the tile size chosen when left open). Reads the header only (no pixels)."""
    scene = Path(scene)
    if not scene.exists():
        raise ConfigError(f"scene {str(scene)!r} does not exist; check the path")
    tile_models = tile_models or {}
    _check_out_root(job.config.out_root)
    _check_device(job.config.device)
    info = _scene_header(scene) if header else {}
    if info:  # before the model specs load (their imports take seconds)
        _check_scene_options(job, scene, info)
    halos = {
        m.model: (int(tile_models[m.stage].halo) if m.stage in tile_models else m.halo())
        for m in job.models
    }
    cfg = job.config.with_model_halos(list(halos.values()))
    if info:
        cfg = _choose_tile(
            job.replace(config=cfg), info["good_bands"], (info["rows"], info["cols"])
        )
    elif cfg.tile is None:
        cfg = cfg.replace(tile=DEFAULT_TILE)
    cfg = (
        cfg.replace(halo=min(int(cfg.halo or 0), int(cfg.tile or DEFAULT_TILE) - 1))
        if job.config.halo is None
        else cfg
    )
    job = job.replace(config=cfg)
    short = {m: h for m, h in halos.items() if cfg.halo is not None and cfg.halo < h}
    if short:
        _log.warning(
            "halo %s px is smaller than the halo the model(s) declare (%s): tile borders may show in the "
            "output (docs/models/decsc.md, Limits); leave --halo unset to use the models' own",
            cfg.halo,
            ", ".join(f"{m} {h} px" for m, h in short.items()),
        )
    if info:
        hw = (info["rows"], info["cols"])
        rows, cols = cfg.read_window(hw)
        cfg.check_tile_memory(
            info["good_bands"], job.model_parts(rows, cols, info["good_bands"]), hw
        )
    return Preflight(job, halos, info)


def plan_run(
    scene: str | Path,
    job: Job,
    *,
    tile_models: dict[str, TileModel] | None = None,
    header: bool = True,
) -> RunPlan:
    """:func:`preflight`, then hash the input (once per run) and name the run folder.

    ``tile_models`` replace a model stage's registry model (e.g. the identity model in tests).
    ``header=False`` skips the header read (a scene's readability is then checked by the ingest stage).
    """
    scene = Path(scene)
    tile_models = tile_models or {}
    pre = preflight(scene, job, tile_models=tile_models, header=header)
    job = pre.job
    weights: dict[str, str | None] = {}
    for m in job.models:
        if m.stage in tile_models:
            weights[tile_models[m.stage].name] = tile_models[m.stage].weights_sha256
        else:
            weights.update(m.weights())
    plan_hash = config_hash(job)
    input_sha = sha256_path(scene)
    run_id = prov.make_run_id(input_sha, plan_hash, weights)
    run_dir = confined_path(job.config.out_root, safe_name(scene.name.split(".")[0]), run_id)
    return RunPlan(
        scene=scene,
        job=job,
        input_sha256=input_sha,
        config_hash=plan_hash,
        weights=weights,
        halos=pre.halos,
        run_id=run_id,
        run_dir=run_dir,
        scene_info=pre.info,
    )


# ---------------------------------------------------------------------------- the one sequence
Call = Callable[..., Any]


def _direct(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def sequence(plan: RunPlan, env: StageEnv, start: str, call: Call = _direct) -> Path:
    """The stages of a run, in order: the only place they are listed. Returns ``run.json``'s path.

    ``call(name, fn, *args)`` runs one stage: a plain call for ``hyperdeq run``, a Prefect task in
    the flow. ``name`` is the stage's name in progress reports, records and the Prefect UI.
    """
    job = plan.job
    scene = call("ingest", stage_ingest, plan)
    tiles = call("tile", stage_tile, plan, scene, "input")
    unmix_source, unmix_tiles = scene, tiles
    if job.denoise is not None:
        call("denoise", stage_model, plan, "denoise", tiles, env)
        unmix_source = call("blend_denoise", stage_blend, plan, "denoise", env)
    if job.unmix is not None:
        fit = call("fit_unmixer", stage_fit_unmixer, plan, unmix_source, env)
        if job.denoise is not None:
            unmix_tiles = call("tile_unmix_input", stage_tile, plan, unmix_source, "unmix_input")
        call("unmix", stage_model, plan, "unmix", unmix_tiles, env, fit)
        call("blend_unmix", stage_blend, plan, "unmix", env)
    outputs = call("write", stage_write, plan)
    return call("record", stage_record, plan, outputs, env, start)  # type: ignore[no-any-return]


def stage_names(plan: RunPlan) -> list[str]:
    """The names of the stages :func:`sequence` runs for ``plan`` (nothing is run)."""
    names: list[str] = []

    def record(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        names.append(name)
        return Path(name)

    sequence(plan, StageEnv(), "", call=record)
    return names


# ---------------------------------------------------------------------------- results and reuse
@dataclass
class RunResult:
    """What a run returns: where the outputs are and how the run went."""

    run_id: str
    run_dir: Path
    status: str
    outputs: dict[str, Path] = field(default_factory=dict)
    failed_tiles: list[str] = field(default_factory=list)
    not_converged: list[str] = field(default_factory=list)
    reused: bool = False
    n_tiles: int = 0
    record: Path | None = None

    @classmethod
    def from_record(cls, run_dir: Path, reused: bool) -> RunResult:
        rec = prov.load_run_record(run_dir)
        outs = {
            k: run_dir / (v["path"] if isinstance(v, dict) else v)
            for k, v in (rec.get("outputs") or {}).items()
        }
        return cls(
            rec["run_id"],
            run_dir,
            rec["status"],
            outs,
            rec.get("failed_tiles", []),
            rec.get("not_converged_tiles", []),
            reused=reused,
            n_tiles=len(next(iter((rec.get("tiles") or {}).values()), [])),
            record=run_dir / prov.RUN_JSON,
        )


def verify_outputs(run_dir: Path) -> list[str]:
    """What is wrong with a completed run's outputs (sizes and sha256s against ``run.json``); [] when intact."""
    return prov.output_problems(run_dir)


def find_completed(plan: RunPlan) -> Path | None:
    """A complete run with this run id under the output root whose outputs verify; else None.

    A complete run whose outputs are damaged is reopened in place: its record becomes ``failed``
    with what is wrong, and the run recomputes what its stages need.
    """
    root = plan.run_dir.parent.parent
    for cand in sorted(root.glob(f"*/{plan.run_id}/{prov.RUN_JSON}")):
        run_dir = cand.parent
        try:
            rec = prov.load_run_record(run_dir)
        except HyperdeqError:
            continue
        if rec.get("status") != prov.COMPLETE:
            continue
        problems = verify_outputs(run_dir)
        if not problems:
            return run_dir
        _log.warning(
            "the completed run %s has damaged outputs (%s); recomputing them",
            run_dir,
            "; ".join(problems),
        )
        if run_dir == plan.run_dir:
            for key in list(rec.get("outputs") or {}):
                name = OUT_NAMES.get(key)
                if name:
                    p = run_dir / name
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(
                        missing_ok=True
                    )
            prov.write_run_record(
                run_dir,
                {
                    **rec,
                    "status": prov.FAILED,
                    "outputs": {},
                    "error": f"damaged outputs: {'; '.join(problems)}",
                },
            )
    return None


# ---------------------------------------------------------------------------- lock, signals
@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One process per run folder: refuse a second run clearly; take over a dead process's lock."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": prov.now()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read_lock(path)
            if other.get("host") == me["host"] and not _alive(int(other.get("pid") or 0)):
                _log.warning(
                    "taking over the stale lock of pid %s (no longer running) on %s",
                    other.get("pid"),
                    run_dir,
                )
                path.unlink(missing_ok=True)
                continue
            raise ConfigError(
                f"run folder {str(run_dir)!r} is in use by another hyperdeq run (host {other.get('host')!r}, "
                f"pid {other.get('pid')!r}, started {other.get('start')!r}); wait for it to finish, or stop it "
                f"(if that process is gone, delete {str(path)!r})"
            ) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:  # the lock came back after each takeover: another process is taking it too
        raise ConfigError(
            f"run folder {str(run_dir)!r} is being taken by another hyperdeq run at the same time; "
            "wait for it to finish"
        )
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict[str, Any]:
    """The lock's holder; waits briefly for a lock just created (empty until its holder writes it)."""
    for _ in range(20):
        try:
            other = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            other = {}
        if other or not path.exists():
            return other if isinstance(other, dict) else {}
        time.sleep(0.05)
    return {}


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def signals_cancel() -> Iterator[None]:
    """In the main thread, turn SIGTERM and SIGINT into :class:`RunCancelled` for the duration."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        raise RunCancelled(f"stopped by {name}", exit_code=128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------- failure
#: errno values that can only come from writing (disk or quota full, file too large, read-only)
_WRITE_ERRNOS = frozenset(
    getattr(errno, n) for n in ("ENOSPC", "EFBIG", "EDQUOT", "EROFS") if hasattr(errno, n)
)
#: what each stage writes, relative to the run directory (named when an OSError has no filename)
_STAGE_WHERE = {
    "ingest": INGESTED,
    "tile": TILES_INPUT,
    "denoise": "tiles/denoise.zarr",
    "blend_denoise": STAGING,
    "fit_unmixer": FIT_DIR,
    "tile_unmix_input": TILES_UNMIX_INPUT,
    "unmix": "tiles/unmix.zarr",
    "blend_unmix": STAGING,
    "write": STAGING,
    "record": prov.RUN_JSON,
}


def _is_cluster_loss(exc: BaseException) -> bool:
    """True for a cancelled task or a closed scheduler connection (also when chained)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(c.__name__ in LOST_NAMES for c in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False


def classify_error(
    run_dir: Path, stage: str, exc: BaseException, client: Any = None, scheduler: str | None = None
) -> BaseException:
    """The error a failed stage raises to the user: HyperdeqErrors and interrupts unchanged; a lost
    scheduler as :class:`ClusterError`; an ``OSError`` as :class:`WriteError` saying what, where and what to do."""
    if isinstance(exc, HyperdeqError) or not isinstance(exc, Exception):
        return exc
    if (
        _is_cluster_loss(exc)
        or client_lost(client)
        or (client is not None and isinstance(exc, ConnectionError | TimeoutError))
    ):
        return cluster_lost_error(
            stage, scheduler_address(client, scheduler), f"{type(exc).__name__}: {exc}"[:300]
        )
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError):
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
        return out
    return exc


def end_record(plan: RunPlan, start: str, stage: str, exc: BaseException) -> None:
    """Mark the run ``failed`` (or ``cancelled``) in ``run.json`` with the stage and the error."""
    cancelled = isinstance(exc, RunCancelled | KeyboardInterrupt)
    err = f"{type(exc).__name__}: {exc}"
    record = {
        **plan.record_head(),
        "status": CANCELLED if cancelled else prov.FAILED,
        "start": start,
        "end": prov.now(),
        "failed_stage": stage,
        "error": err[:1500],
        "outputs": {},
        "hint": "rerun the same command to resume",
    }
    try:
        prov.write_run_record(plan.run_dir, record)
    except Exception as wexc:  # a full disk may refuse even this small file
        exc.add_note(
            f"(could not mark {str(plan.run_dir / prov.RUN_JSON)!r} {record['status']} either: {wexc})"
        )


# ---------------------------------------------------------------------------- execution
ClusterArg = ClusterSpec | ClusterHandle | Executor | Any


def _handle_for(
    cluster: ClusterArg, plan: RunPlan, tile_models: dict[str, TileModel] | None = None
) -> tuple[ClusterHandle, bool]:
    """The cluster to use and whether this run owns it (opened here, closed at the end)."""
    if isinstance(cluster, ClusterHandle):
        return cluster, False
    if isinstance(cluster, ClusterSpec):
        preload: dict[str, Any] = {}
        for m in plan.job.models:  # a replaced stage model never loads the registry's weights
            if m.stage not in (tile_models or {}):
                preload.update(m.preload())
        return open_cluster(cluster, plan.config.device, preload), True
    return ClusterHandle(
        client=cluster, gpu=has_gpu_workers(cluster)
    ), False  # a distributed.Client


class _Connection:
    """Opens the run's cluster when the first stage needs it; remembers it to close and to report."""

    def __init__(self, cluster: ClusterArg, plan: RunPlan, base: StageEnv) -> None:
        self.cluster, self.plan, self.base = cluster, plan, base
        self.handle: ClusterHandle | None = None
        self.owned = False

    @property
    def client(self) -> Any:
        return self.handle.client if self.handle is not None else None

    def open(self) -> StageEnv:
        self.handle, self.owned = _handle_for(self.cluster, self.plan, self.base.tile_models)
        h = self.handle
        desc = h.describe()
        self.base.log(
            f"tile batches run on {desc.get('scheduler')} ({desc.get('n_workers', 0)} workers, GPU workers: "
            f"{desc.get('gpu_workers') or 'none'}); Dask dashboard: {desc.get('dashboard')}"
        )
        return dataclasses.replace(
            self.base,
            model_executor=h.model_executor(),
            executor=h.executor(),
            n_workers=max(1, h.n_workers()),
            cluster=desc,
            client=h.client,
            opener=None,
            _opened={},
        )

    def close(self) -> None:
        if self.owned and self.handle is not None:
            self.handle.close()


def _env_for(
    cluster: ClusterArg, plan: RunPlan, base: StageEnv
) -> tuple[StageEnv, _Connection | None]:
    """The stages' environment: a plain Executor runs everything; otherwise a cluster opened lazily."""
    if isinstance(cluster, Executor):
        n = int(getattr(cluster, "_max_workers", 2) or 2)
        env = dataclasses.replace(
            base,
            model_executor=cluster,
            executor=cluster,
            n_workers=n,
            cluster={"executor": type(cluster).__name__},
        )
        return env, None
    conn = _Connection(cluster, plan, base)
    return dataclasses.replace(base, opener=conn.open), conn


def execute(
    plan: RunPlan,
    cluster: ClusterArg,
    *,
    call: Call = _direct,
    progress: StageProgress | None = None,
    log: Callable[[str], None] | None = None,
    tile_models: dict[str, TileModel] | None = None,
) -> RunResult:
    """Run :func:`sequence` for ``plan`` on ``cluster``, or return the verified completed run.

    ``cluster``: a :class:`ClusterSpec` (opened when the first stage needs it and closed here), a
    :class:`ClusterHandle` or a ``distributed.Client`` (used, not closed), or any ``Executor``
    (everything runs through it).
    """
    say = log or _log.info
    done = find_completed(plan)
    if done is not None:
        say(f"reusing the identical completed run {done} (outputs verified)")
        return RunResult.from_record(done, reused=True)
    with run_lock(plan.run_dir):
        start = prov.now()
        prov.write_run_record(
            plan.run_dir, {**plan.record_head(), "status": prov.RUNNING, "start": start}
        )
        current = "ingest"
        scheduler = cluster.address if isinstance(cluster, ClusterSpec) else None
        env, conn = _env_for(
            cluster, plan, StageEnv(progress=progress, log=say, tile_models=tile_models or {})
        )

        def traced(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            nonlocal current
            current = name
            return call(name, fn, *args, **kwargs)

        try:
            rec_path = sequence(plan, env, start, call=traced)
        except BaseException as exc:
            err = classify_error(
                plan.run_dir, current, exc, conn.client if conn else None, scheduler
            )
            end_record(plan, start, current, err)
            if err is exc:
                raise
            raise err from exc
        finally:
            if conn is not None:
                conn.close()
    res = RunResult.from_record(plan.run_dir, reused=False)
    if res.status != prov.COMPLETE and not res.failed_tiles:
        raise ModelError(
            f"run {plan.run_id!r} ended with status {res.status!r}; see {str(rec_path)!r}"
        )
    return res


def run_scene(
    scene: str | Path,
    job: Job | None = None,
    cluster: ClusterArg | None = None,
    progress: StageProgress | None = None,
    *,
    tile_models: dict[str, TileModel] | None = None,
    on_plan: Callable[[RunPlan], None] | None = None,
) -> RunResult:
    """Plan and execute one scene (``hyperdeq run``); resume or reuse a previous identical run.

    ``cluster``: a :class:`ClusterSpec` (default: a local cluster), a ``ClusterHandle``, a
    ``distributed.Client`` or any ``Executor``. ``tile_models`` replace a stage's registry model
    (e.g. ``{"denoise": IdentityTileModel()}`` in tests). ``on_plan`` sees the plan before work starts.
    """
    job = job or Job()
    cl = cluster if cluster is not None else ClusterSpec()
    if isinstance(cl, ClusterSpec):  # first: cheap, and must not wait for the input to be hashed
        cl.check_reachable()
    plan = plan_run(scene, job, tile_models=tile_models)
    if on_plan is not None:
        on_plan(plan)
    with signals_cancel():
        return execute(plan, cl, progress=progress, tile_models=tile_models)
