"""Run a model over tiles through any ``concurrent.futures.Executor``.

The same loop serves a ``ThreadPoolExecutor`` in unit tests, a ``ProcessPoolExecutor``, and a Dask
``distributed`` client's executor (``client.get_executor(resources=...)``). Tasks carry paths and
a small picklable model handle; each task processes a *batch* of tiles (to keep the device busy
and the scheduler quiet) and returns small records, never arrays. Each tile's record is written
after its data: it is the tile's commit marker, so a rerun skips tiles whose record says ``ok`` and
whose stored bytes still hash to the recorded sha256.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from pipeline.errors import ConfigError
from pipeline.grid import Tile, TileGrid
from pipeline.records import FAILED, OK, TileRecord
from pipeline.tiles import (
    load_records,
    read_tile,
    store_attrs,
    tile_checksum,
    verify_tile,
    write_record,
    write_tile_output,
)


@runtime_checkable
class TileModel(Protocol):
    """What the pipeline needs from a model (implemented in ``workers/infer.py``).

    ``out_names``: channel names of the output, or None when the output has the input's channels.
    ``__call__(cube)``: ``cube`` is ``(channels, h, w)`` float32 with NaN = nodata; returns the
    output ``(out_channels, h, w)`` and stats (``iterations``, ``residual``, ``converged``,
    optionally ``device`` and ``worker``). Instances must be small and picklable: they load their
    weights lazily, once per process.
    """

    @property
    def name(self) -> str: ...

    @property
    def halo(self) -> int: ...

    @property
    def weights_sha256(self) -> str | None: ...

    @property
    def out_names(self) -> tuple[str, ...] | None: ...

    def __call__(self, cube: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]: ...


ProgressFn = Callable[[int, int, TileRecord], None]


@runtime_checkable
class TileFeed(Protocol):
    """Per-tile progress from wherever the tasks run (a Dask feed lives in ``workers/``).

    ``open(put)`` returns the small picklable callable each task calls with a tile's record once
    the tile is committed; the feed delivers those records to ``put`` (thread-safe, any thread).
    ``close()`` stops delivering. Without a feed, a ``ThreadPoolExecutor`` reports per tile
    in-process and any other executor per finished batch.
    """

    def open(self, put: Callable[[TileRecord], None]) -> Callable[[TileRecord], None] | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class TileJob:
    """One task: run ``model`` over ``tiles`` from ``source`` (tile store) into ``dest``."""

    source: str
    dest: str
    grid: TileGrid
    tiles: tuple[Tile, ...]
    model: Any
    stage: str = ""
    #: called with each tile's record once written (per-tile progress; a failure here is ignored)
    notify: Any = None


@dataclass(frozen=True)
class StageResult:
    """What :func:`run_tiles` returns: one record per run tile, in index order."""

    records: tuple[TileRecord, ...] = ()
    wall_s: float = 0.0

    @property
    def failed(self) -> list[TileRecord]:
        return [r for r in self.records if r.status == FAILED]

    @property
    def not_converged(self) -> list[TileRecord]:
        return [r for r in self.records if r.ok and r.converged is False]

    @property
    def ok_keys(self) -> set[str]:
        return {r.key for r in self.records if r.ok}


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def _run_tile(job: TileJob, tile: Tile) -> TileRecord:
    """Read, infer and write one tile; its record (not yet written), ``failed`` with the error."""
    got: dict[str, Any] = {"worker": _worker_name()}
    t0 = time.perf_counter()
    try:
        cube = read_tile(job.source, job.grid, tile)
        got["input_checksum"] = tile_checksum(cube)
        result, stats = job.model(cube)
        stats = dict(stats or {})
        got["checksum"] = write_tile_output(
            job.dest, job.grid, tile, np.asarray(result, dtype=np.float32)
        )
        got["worker"] = stats.pop("worker", got["worker"])
        got["device"] = stats.pop("device", "cpu")
        for k in ("iterations", "residual", "converged"):
            got[k] = _jsonable(stats.pop(k, None))
        got["stats"] = _jsonable(stats)
        got["status"] = OK
    except Exception as exc:  # recorded, listed in the run record, never hidden
        got["status"] = FAILED
        got["error"] = f"{type(exc).__name__}: {exc}"
        got["traceback"] = traceback.format_exc(limit=5)
    return TileRecord(
        key=tile.key,
        index=tile.index,
        stage=job.stage,
        model=getattr(job.model, "name", type(job.model).__name__),
        weights_sha256=getattr(job.model, "weights_sha256", None),
        read=(tile.read.y0, tile.read.y1, tile.read.x0, tile.read.x1),
        core=(tile.core.y0, tile.core.y1, tile.core.x0, tile.core.x1),
        wall_s=round(time.perf_counter() - t0, 4),
        **got,
    )


def process_batch(job: TileJob) -> list[TileRecord]:
    """Task body: read, infer, write and record each tile of the batch (failures are recorded, not raised)."""
    out: list[TileRecord] = []
    for tile in job.tiles:
        rec = _run_tile(job, tile)
        write_record(job.dest, rec)
        out.append(rec)
        if job.notify is not None:
            try:
                job.notify(rec)
            except Exception:  # progress is monitoring: it never fails a tile
                pass
    return out


def _put(q: queue.Queue[tuple[Any, Any]], batch: tuple[Tile, ...], fut: Any) -> None:
    q.put((batch, fut))


def _put_tile(q: queue.Queue[tuple[Any, Any]], rec: TileRecord) -> None:
    q.put(("tile", rec))


def effective_batch_size(n_tiles: int, batch_size: int, n_workers: int | None = None) -> int:
    """``batch_size``, capped at ``ceil(n_tiles / n_workers)`` when ``n_workers`` is given.

    With the cap, a stage of ``n_tiles`` makes at least ``min(n_tiles, n_workers)`` batches, so no
    worker idles while another still has tiles queued in its batch (a 4-tile scene on 2 workers
    runs as 2 batches of 2, not 1 batch of 4); large stages keep ``batch_size``.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(
            f"batch_size must be a positive integer, got {batch_size!r}; pass e.g. batch_size=4"
        )
    if n_workers is None:
        return batch_size
    if not isinstance(n_workers, int) or isinstance(n_workers, bool) or n_workers < 1:
        raise ConfigError(
            f"n_workers must be a positive integer or None, got {n_workers!r}; pass e.g. n_workers=2"
        )
    return max(1, min(batch_size, -(-n_tiles // n_workers)))


def plan_batches(
    tiles: Sequence[Tile], batch_size: int, n_workers: int | None = None
) -> list[tuple[Tile, ...]]:
    """Tiles in batches of at most ``batch_size``.

    Without ``n_workers``: consecutive tiles (row-major) in groups of ``batch_size``. With it: at
    least ``min(len(tiles), n_workers)`` batches (so no worker idles on a small stage,
    :func:`effective_batch_size`), balanced by work: tiles, largest read window first, go to the
    batch with the least work that still has room, and the batches are returned heaviest first
    (a scene whose edge tiles are clipped no longer gives one worker twice the pixels of another).
    Each batch lists its tiles row-major.
    """
    ts = sorted(tiles)
    size = effective_batch_size(len(ts), batch_size, n_workers)
    if n_workers is None or len(ts) <= 1:
        return [tuple(ts[i : i + size]) for i in range(0, len(ts), size)]
    n_batches = -(-len(ts) // size)
    loads = [0] * n_batches
    groups: list[list[Tile]] = [[] for _ in range(n_batches)]
    for t in sorted(ts, key=lambda t: (-_work(t), t)):
        i = min((j for j in range(n_batches) if len(groups[j]) < batch_size), key=loads.__getitem__)
        groups[i].append(t)
        loads[i] += _work(t)
    order = sorted(range(n_batches), key=lambda j: (-loads[j], j))
    return [tuple(sorted(groups[j])) for j in order if groups[j]]


def _work(t: Tile) -> int:
    """A tile's work: the pixels of its read window (what the models compute on)."""
    r = t.read
    return (r.y1 - r.y0) * (r.x1 - r.x0)


#: seconds between checks, while waiting for batches, that a Dask client is still connected
_POLL_S = 2.0


def _client_closed(client: Any) -> bool:
    """True when a distributed client has closed (it gave up reconnecting to its scheduler)."""
    return client is not None and str(getattr(client, "status", "running")) in ("closing", "closed")


def _failed_records(batch: Sequence[Tile], stage: str, why: str) -> list[TileRecord]:
    return [
        TileRecord(
            key=t.key, index=t.index, stage=stage, status=FAILED, error=f"task failed: {why}"
        )
        for t in batch
    ]


def _reusable_records(
    model: TileModel,
    source: str | Path,
    dest: str | Path,
    grid: TileGrid,
    todo_tiles: Sequence[Tile],
) -> dict[str, TileRecord]:
    """Records of tiles a resumed run may reuse, marked ``reused``, by tile key.

    A tile is reused only when its record says ``ok``, it was computed from the same input bytes
    with the same weights, and its stored output still matches its checksum.
    """
    reused: dict[str, TileRecord] = {}
    existing = load_records(dest)
    inputs = store_attrs(source).get("checksums", {})
    for t in todo_tiles:
        rec = existing.get(t.key)
        if (
            rec is not None
            and rec.ok
            and rec.input_checksum == inputs.get(t.key)
            and rec.weights_sha256 == getattr(model, "weights_sha256", None)
            and verify_tile(dest, grid, t, rec.checksum)
        ):
            reused[t.key] = replace(rec, reused=True)
    return reused


def _record_cut_off(
    dest: str | Path, batches: Sequence[Sequence[Tile]], stage: str, client: Any
) -> dict[str, TileRecord]:
    """Write and return failed records for batches that never reported because the client closed."""
    out: dict[str, TileRecord] = {}
    for batch in batches:
        recs = _failed_records(
            batch,
            stage,
            "CancelledError: the Dask client closed "
            f"(status {getattr(client, 'status', '?')!s}) before this batch reported",
        )
        for r in recs:
            write_record(dest, r)
            out[r.key] = r
    return out


def _collect(
    results: queue.Queue[tuple[Any, Any]],
    batches: list[tuple[Tile, ...]],
    dest: str | Path,
    stage: str,
    done_records: dict[str, TileRecord],
    tick: Callable[[TileRecord], None],
    client: Any,
) -> None:
    """Wait for every batch (``client``: a Dask ClientExecutor's client, else None); ``tick`` each tile
    as its commit or its batch is reported."""
    unreported = set(range(len(batches)))
    index_of = {id(b): i for i, b in enumerate(batches)}
    while unreported:
        try:
            batch, fut = results.get(timeout=_POLL_S)
        except queue.Empty:
            if not _client_closed(client):
                continue
            # the client gave up on its scheduler: futures that were being gathered may never
            # resolve, so the batches still out are recorded as cut off instead of waited for
            done_records.update(
                _record_cut_off(dest, [batches[i] for i in sorted(unreported)], stage, client)
            )
            break
        if isinstance(batch, str):  # a tile committed ("tile", record)
            tick(fut)
            continue
        unreported.discard(index_of[id(batch)])
        try:
            recs = list(fut.result())
        except Exception as exc:  # the task itself died (worker lost, unpicklable model, ...)
            recs = _failed_records(batch, stage, f"{type(exc).__name__}: {exc}")
            for r in recs:
                write_record(dest, r)
        for rec in recs:
            done_records[rec.key] = rec
            tick(rec)


def run_tiles(
    executor: Executor,
    model: TileModel,
    source: str | Path,
    dest: str | Path,
    grid: TileGrid,
    *,
    tiles: Sequence[Tile] | None = None,
    batch_size: int = 4,
    n_workers: int | None = None,
    stage: str = "",
    resume: bool = True,
    progress: ProgressFn | None = None,
    submit: Callable[..., Any] | None = None,
    feed: TileFeed | None = None,
) -> StageResult:
    """Run ``model`` over ``tiles`` (default: every run tile of ``grid``) and return their records.

    ``dest`` must already exist (:func:`pipeline.tiles.create_output_store`). With ``resume`` a tile
    whose record says ``ok``, was computed from the same input bytes (input checksum) with the same
    weights, and whose
    stored output still matches its checksum is reused (status
    in the returned record stays ``ok``, with ``reused: True``). ``submit`` overrides
    ``executor.submit`` (e.g. to pass Dask resources per task). ``n_workers`` (the workers that
    run these tasks) caps the batch size at ``ceil(tiles still to run / n_workers)`` so that
    small stages spread over every worker (:func:`effective_batch_size`); None keeps ``batch_size``.
    ``progress(done, total, record)`` is called in this thread once per tile: as each tile is
    committed when the tasks can say so (a ``ThreadPoolExecutor``, or ``feed``: :class:`TileFeed`),
    else when its batch reports.
    """
    t0 = time.perf_counter()
    todo_tiles = sorted(grid.tiles if tiles is None else tiles)
    total = len(todo_tiles)
    done_records = _reusable_records(model, source, dest, grid, todo_tiles) if resume else {}
    n_done = 0
    for rec in done_records.values():
        n_done += 1
        if progress:
            progress(n_done, total, rec)
    pending = [t for t in todo_tiles if t.key not in done_records]
    pending_keys = {t.key for t in pending}
    counted: set[str] = set()

    def tick(rec: TileRecord) -> None:
        nonlocal n_done
        if rec.key not in pending_keys or rec.key in counted:
            return
        counted.add(rec.key)
        n_done += 1
        if progress:
            progress(n_done, total, rec)

    batches = plan_batches(pending, batch_size, n_workers)
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    notify: Any = None
    if progress and batches:
        if feed is not None:
            notify = feed.open(partial(_put_tile, results))
        elif isinstance(executor, ThreadPoolExecutor):
            notify = partial(_put_tile, results)
    do_submit = submit or executor.submit
    try:
        for batch in batches:
            job = TileJob(str(source), str(dest), grid, batch, model, stage, notify)
            fut = do_submit(process_batch, job)
            fut.add_done_callback(partial(_put, results, batch))
        _collect(
            results, batches, dest, stage, done_records, tick, getattr(executor, "_client", None)
        )
    finally:
        if feed is not None and notify is not None:
            feed.close()
    records = tuple(done_records[t.key] for t in todo_tiles)
    return StageResult(records=records, wall_s=time.perf_counter() - t0)
