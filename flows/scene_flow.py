"""``process_scene``: one scene through every stage, as a Prefect flow.

The stages and their order come from :func:`workers.run.sequence`, the same sequence ``hyperdeq
run`` executes; this flow only wraps each stage as a Prefect task (one task per stage: Prefect per
scene, Dask per tile batch) and adds monitoring: the progress artifact, the run report, a watch
for cancellation. Resuming is the library's: each stage reuses what an earlier attempt of the same
run finished (nothing is cached by Prefect, so no result storage is created per run).
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.artifacts import (
    publish_scene_artifacts,
    render_quicklooks,
    scene_progress,
    summary_from_record,
    write_quicklooks,
)
from flows.options import RunOptions, options_to_build
from pipeline.errors import ClusterError, ModelError

#: errors worth a retry of the stage (a lost worker or scheduler, an I/O timeout); bad input never is
TRANSIENT = (ClusterError, TimeoutError, ConnectionError)
STAGE_RETRIES = 2
#: per-stage timeout: ``3600`` (every stage) or ``denoise=7200,unmix=1800,*=3600`` (``*``: the others)
TIMEOUT_ENV = "HYPERDEQ_STAGE_TIMEOUT_S"
#: the global concurrency limit that caps scenes running at once across processes, when it exists
SCENE_LIMIT = "hyperdeq-scenes"


def _retry_transient(_task: Any, _run: Any, state: Any) -> bool:
    """Retry a stage that failed with a :data:`TRANSIENT` error, never one that ran past its own
    timeout (it would again) nor one that failed on its input or options."""
    from prefect.task_engine import TaskRunTimeoutError

    try:
        state.result()
    except TaskRunTimeoutError:
        return False
    except TRANSIENT:
        return True
    except BaseException:
        return False
    return False


def stage_timeout(stage: str, spec: str | None = None) -> float | None:
    """Seconds ``stage`` may run (:data:`TIMEOUT_ENV`, or ``spec``); None: no timeout."""
    spec = os.environ.get(TIMEOUT_ENV, "") if spec is None else spec
    table: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, _, val = part.rpartition("=")
        table[key.strip() or "*"] = val.strip()
    raw = table.get(stage, table.get("*"))
    if raw in (None, "", "0", "none"):
        return None
    try:
        secs = float(raw)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(
            f"{TIMEOUT_ENV}={spec!r}: {raw!r} is not a number of seconds; use e.g. "
            "'3600' or 'denoise=7200,*=3600'"
        ) from None
    if secs <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={spec!r}: the timeout of {stage!r} must be positive")
    return secs


def _prefect_call(scene_name: str, progress: Any) -> Any:
    """The ``call`` of :func:`workers.run.sequence` that runs each stage as a Prefect task."""

    def call(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t = task(
            fn,
            name=name.replace("_", "-"),
            task_run_name=f"{name.replace('_', ' ')} {scene_name}",
            cache_policy=NO_CACHE,
            retries=STAGE_RETRIES,
            retry_delay_seconds=[10, 60],
            retry_condition_fn=_retry_transient,
            timeout_seconds=stage_timeout(name),
        )
        out = t(*[quote(a) for a in args], **{k: quote(v) for k, v in kwargs.items()})
        progress.stage_done(name)
        return out

    return call


@contextlib.contextmanager
def scene_slot(log: Any = None) -> Any:
    """Hold one slot of the global concurrency limit :data:`SCENE_LIMIT` while a scene runs, when the
    server has that limit (``prefect gcl create hyperdeq-scenes --limit N``); else do nothing, so a
    plain run never waits on a limit nobody set."""
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(SCENE_LIMIT)
        active = bool(getattr(limit, "active", True))
    except Exception:  # not defined (404) or no server: no limit
        active = False
    if not active:
        yield
        return
    from prefect.concurrency.sync import concurrency

    if log is not None:
        log.info("waiting for a slot of the global concurrency limit %r", SCENE_LIMIT)
    with concurrency(SCENE_LIMIT, occupy=1):
        yield


class CancelWatch:
    """Watch this flow run's state on the server; on Cancelling/Cancelled, stop the run.

    A run started from a deployment is stopped by Prefect itself; one started in-process (``hyperdeq
    flow run``, ``sweep``, ``demo``) is not, so this thread interrupts the main thread with SIGTERM,
    which the run turns into a ``cancelled`` record (``workers.run.signals_cancel``). Off the main
    thread (a sweep's scenes run in threads) it sets :attr:`event` for the progress hook to act on.
    """

    def __init__(self, flow_run_id: Any, interval_s: float = 3.0) -> None:
        self.flow_run_id, self.interval_s = flow_run_id, interval_s
        self.event = threading.Event()
        self._stop = threading.Event()
        self._main = threading.current_thread() is threading.main_thread()
        self._thread = threading.Thread(
            target=self._watch, name="hyperdeq-cancel-watch", daemon=True
        )

    def __enter__(self) -> CancelWatch:
        if self.flow_run_id is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def _cancelled(self) -> bool:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            st = client.read_flow_run(self.flow_run_id).state
        return st is not None and st.type.value in ("CANCELLING", "CANCELLED")

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self._cancelled():
                    continue
            except Exception:  # a monitoring hiccup never stops a run
                continue
            self.event.set()
            if (
                self._main and not self._stop.is_set()
            ):  # not once the run has left the watched block
                _thread.interrupt_main(signal.SIGTERM)
            return


def _label(plan: Any, job: Any) -> tuple[str, list[str]]:
    stem = Path(str(plan.scene)).name.split(".")[0]
    models = [m.model for m in job.models]
    return f"{stem} · {plan.run_id}", ["hyperdeq", f"scene:{stem}", *(f"model:{m}" for m in models)]


def _name_run(flow_run_id: Any, name: str, tags: list[str]) -> None:
    """Rename the flow run ``<scene stem> · <run id>`` and tag it (monitoring only)."""
    if flow_run_id is None:
        return
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            # update_flow_run replaces the tags: keep the run's own (a deployment's, the caller's)
            current = list(client.read_flow_run(flow_run_id).tags or [])
            client.update_flow_run(
                flow_run_id, name=name, tags=list(dict.fromkeys([*current, *tags]))
            )
    except Exception as exc:
        logging.getLogger("hyperdeq.flow").warning("could not rename the flow run: %s", exc)


def _scene_name() -> str:
    from prefect.runtime import flow_run

    return Path(str((flow_run.parameters or {}).get("scene", "scene"))).name.split(".")[0]


@task(name="report", task_run_name="report {label}", cache_policy=NO_CACHE)
def report_task(run_dir: str, label: str, reused: bool = False) -> dict[str, Any]:
    """Run report, quality table and quicklooks from the run record (monitoring only)."""
    summary = summary_from_record(run_dir, reused=reused)
    looks = write_quicklooks(run_dir, render_quicklooks(run_dir))
    return {k: str(v) for k, v in publish_scene_artifacts(summary, looks).items()}


@flow(
    name="process-scene",
    flow_run_name=lambda: _scene_name(),
    description="Denoise (DECSC) and unmix (DEQ-Unmix) one hyperspectral scene, tile batches on Dask.",
    log_prints=True,
    validate_parameters=True,
)
def process_scene(
    scene: str, out_dir: str = "hyperdeq-out", options: RunOptions = RunOptions()
) -> str:  # type: ignore[valid-type]
    """Run every stage of ``workers.run.sequence`` on ``scene``; returns the path of ``run.json``.

    ``scene``: the scene file or zarr store to process. ``out_dir``: the output root (the run goes in
    ``out_dir/<scene>/<run id>/``). ``options``: the run options (one table: flows/options.py).
    Raises when tiles failed (after the record and the report are written, so the failure is documented).
    """
    from prefect.runtime import flow_run

    from workers.run import RunCancelled, execute, plan_run, signals_cancel, stage_names

    log = get_run_logger()
    job, cluster = options_to_build(options, out_dir)  # type: ignore[arg-type]
    plan = plan_run(scene, job)
    name, tags = _label(plan, job)
    _name_run(flow_run.get_id(), name, tags)
    log.info(
        "scene %s: run %s in %s (config %s)",
        plan.scene.name,
        plan.run_id,
        plan.run_dir,
        plan.config_hash[:12],
    )
    cluster.check_reachable()
    progress = scene_progress(plan.scene.name, stage_names(plan), logger=log)
    t0 = time.perf_counter()
    try:
        with scene_slot(log), CancelWatch(flow_run.get_id()) as watch, signals_cancel():

            def tile_progress(stage: str, done: int, total: int) -> None:
                if watch.event.is_set():
                    raise RunCancelled("cancelled in Prefect")
                progress(stage, done, total)

            res = execute(
                plan,
                cluster,
                call=_prefect_call(plan.scene.name, progress),
                progress=tile_progress,
                log=log.info,
            )
    except (
        RunCancelled
    ) as exc:  # the record says 'cancelled'; the flow run ends Cancelled, not Crashed
        from prefect.states import Cancelled

        log.warning(
            "scene %s: run %s cancelled (%s); %s says 'cancelled'; rerun to resume",
            plan.scene.name,
            plan.run_id,
            exc,
            plan.run_dir / "run.json",
        )
        return Cancelled(
            message=f"run {plan.run_id} of {plan.scene.name} cancelled ({exc}); "  # type: ignore[return-value]
            "rerun the same command to resume"
        )
    if res.reused:
        log.info(
            "scene %s already has a complete run with this configuration and weights: %s",
            plan.scene.name,
            res.run_dir,
        )
    else:
        log.info(
            "scene %s processed in %.1f s; run record %s",
            plan.scene.name,
            time.perf_counter() - t0,
            res.record,
        )
    report_task(str(res.run_dir), label=plan.scene.name, reused=res.reused)
    if res.status != "complete":
        raise ModelError(
            f"run {res.run_id!r} of {plan.scene.name!r} ended {res.status!r} with {len(res.failed_tiles)} failed "
            f"tiles ({res.failed_tiles[:5]!r}); see {str(res.record)!r}. Fix the cause and rerun: completed "
            "tiles are reused."
        )
    return str(res.record)


logging.getLogger("hyperdeq").setLevel(logging.INFO)
