"""Fault-injection harness: an instrumented tile model, a driver process, loopback Dask clusters.

The instrumented model wraps a real :class:`pipeline.runner.TileModel` (the identity geometry model,
or DECSC when its weights are installed) and only adds what a fault test needs: a per-execution log
(to count how often each tile ran, across processes), an optional delay (so that a kill lands
mid-run), and an optional self-SIGKILL of the worker process on the N-th execution.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.reliability._data import ROOT

PY = sys.executable
#: the tiled configuration every fault test uses (16 tiles on the 64x64 crop, one tile per task);
#: the tile stores are kept so that tests can count executions and check records after completion
RUN_KW: dict[str, Any] = {"tile": 16, "halo": 4, "batch_size": 1, "keep_tiles": True}


def fault_job(out_root: Path | str, **config: Any) -> Any:
    """The job every fault test runs: denoising only (its model replaced through ``tile_models``)."""
    from pipeline.config import RunConfig
    from workers.run import Job

    return Job(RunConfig(out_root=Path(out_root), **{**RUN_KW, **config}), unmix=None)


def decsc_available() -> bool:
    """True when the shipped DECSC weights exist and pass every check of the loader."""
    try:
        from workers.denoise.api import load_denoiser

        load_denoiser("cpu")
        return True
    except Exception:
        return False


def inner_model(kind: str = "identity") -> Any:
    from workers.infer import DenoiseTileModel, IdentityTileModel

    if kind == "decsc":
        return DenoiseTileModel.from_registry("cpu")
    return IdentityTileModel(halo=0)


@dataclass(frozen=True)
class InstrumentedModel:
    """A real tile model plus fault-injection hooks (picklable; safe across processes)."""

    inner: Any
    log_dir: str
    delay_s: float = 0.0
    kill_at: int = 0  # SIGKILL this process at the N-th execution overall (once); 0: never

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def halo(self) -> int:
        return self.inner.halo

    @property
    def weights_sha256(self) -> str | None:
        return self.inner.weights_sha256

    @property
    def out_names(self) -> tuple[str, ...] | None:
        return self.inner.out_names

    def __call__(self, cube: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        from pipeline.tiles import tile_checksum

        log = Path(self.log_dir)
        line = f"{tile_checksum(cube)} {os.getpid()}\n"
        fd = os.open(log / "executions.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        if self.kill_at:
            n = len((log / "executions.log").read_text().splitlines())
            if n >= self.kill_at:
                try:
                    fd = os.open(log / "killed.marker", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    os.kill(os.getpid(), signal.SIGKILL)
                except FileExistsError:
                    pass
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.inner(cube)


def executions(log_dir: Path, tile_store: Path) -> dict[str, int]:
    """How many times each tile key was executed (from the model's log and the input checksums)."""
    from pipeline.tiles import store_attrs

    by_sum = {v: k for k, v in store_attrs(tile_store)["checksums"].items()}
    out: dict[str, int] = {}
    f = log_dir / "executions.log"
    for line in f.read_text().splitlines() if f.is_file() else []:
        key = by_sum.get(line.split()[0], "?")
        out[key] = out.get(key, 0) + 1
    return out


# ------------------------------------------------------------------------------- outputs
def output_digests(run_dir: Path) -> dict[str, str]:
    """sha256 of every data-bearing output file of a run (zarr chunks of data arrays, COG, PNG).

    Metadata files holding timestamps (``zarr.json`` with the run record, the STAC Item) are left
    out; the data chunks, GeoTIFFs and PNGs must be byte-identical between runs.
    """
    rec = json.loads((run_dir / "run.json").read_text())
    out: dict[str, str] = {}
    rels = (v["path"] if isinstance(v, dict) else v for v in rec["outputs"].values())
    for rel in sorted(r for r in rels if r != "stac_item.json"):
        p = run_dir / rel
        files = (
            [p]
            if p.is_file()
            else sorted(f for f in p.rglob("*") if f.is_file() and f.name != "zarr.json")
        )
        for f in files:
            out[str(f.relative_to(run_dir))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run_dirs(out_root: Path) -> list[Path]:
    return sorted(p.parent for p in out_root.glob("*/*/run.json"))


def wait_for(pred: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(poll)


def n_records(out_root: Path, stage: str = "denoise") -> int:
    return sum(1 for _ in out_root.glob(f"*/*/tiles/{stage}.records/*.json"))


# ------------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DASK_DISTRIBUTED__WORKER__DAEMON="False")
    return e


def spawn(args: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
    """Start a process in its own session (so the whole tree can be killed), output to ``log``.

    The output goes through a pipe drained by a thread of this process: the child's own file
    limits (the disk-full test lowers RLIMIT_FSIZE) never stop it from reporting its error.
    """
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env(),
        start_new_session=True,
        **kw,
    )

    def drain() -> None:
        assert proc.stdout is not None
        with open(log, "wb") as fh:
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
                fh.write(chunk)
                fh.flush()

    threading.Thread(target=drain, daemon=True).start()
    return proc


def run_sync(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a process to completion (repository root, test environment), capturing its output."""
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env()
    )


def kill_tree(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal a process started by :func:`spawn` and everything in its session."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def session_alive(pgid: int) -> list[int]:
    """Pids still alive in the process group ``pgid`` (leak check)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return out


class LoopbackCluster:
    """``dask scheduler`` + N ``dask worker`` processes on 127.0.0.1 (each single-threaded)."""

    def __init__(self, tmp: Path, n_workers: int = 2) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler = spawn(
            [
                str(Path(PY).parent / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-dashboard",
            ],
            tmp / "scheduler.log",
        )
        self.workers = [
            spawn(
                [
                    str(Path(PY).parent / "dask"),
                    "worker",
                    self.address,
                    "--nthreads",
                    "1",
                    "--nworkers",
                    "1",
                    "--no-dashboard",
                    "--memory-limit",
                    "2GiB",
                    "--local-directory",
                    str(tmp / f"w{i}"),
                    "--death-timeout",
                    "20",
                ],
                tmp / f"worker{i}.log",
            )
            for i in range(n_workers)
        ]
        self.n_workers = n_workers

    def wait_ready(self, timeout: float = 120) -> None:
        from distributed import Client

        with Client(self.address, timeout="60s") as c:
            c.wait_for_workers(self.n_workers, timeout=timeout)

    def close(self) -> None:
        for p in [*self.workers, self.scheduler]:
            kill_tree(p, signal.SIGTERM)
        for p in [*self.workers, self.scheduler]:
            kill_tree(p, signal.SIGKILL)


# ------------------------------------------------------------------------------- the command line
HYPERDEQ = str(Path(PY).parent / "hyperdeq")
#: what ``hyperdeq run`` logs once its Dask cluster is up (absent: no cluster was started)
CLUSTER_STARTED = "tile batches run on"


def refuse_cli(
    args: list[str],
    root: Path,
    match: str,
    *,
    prefix: tuple[str, ...] = (),
    env_extra: dict[str, str] | None = None,
    timeout: float = 300,
) -> tuple[dict[str, Any], list[str]]:
    """Run ``hyperdeq ARGS`` (behind ``prefix``) and check it refused the input as a user must see it:
    exit status 2, an ``error:`` line matching ``match``, no traceback, no Dask cluster started and
    no ``run.json`` anywhere under ``root``. Returns what was measured (``refuse_s``: wall time of
    the whole process, interpreter start included; ``refuse_cpu_s``: its CPU time, which a busy
    machine does not inflate) and what is wrong ([] when the refusal is right)."""
    import re
    import resource

    e = env()
    e.update(env_extra or {})
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(
        [*prefix, HYPERDEQ, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=e
    )
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (
        cpu1.ru_stime - cpu0.ru_stime
    )  # of the command, whatever the load
    text = r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    records = sorted(str(p) for p in root.rglob("run.json"))
    measured = {
        "exit_code": r.returncode,
        "refuse_s": round(wall, 2),
        "refuse_cpu_s": round(cpu, 2),
        "traceback": "Traceback" in text,
        "cluster_started": CLUSTER_STARTED in text,
        "run_json_written": bool(records),
        "complete_marked": sum(
            json.loads(Path(p).read_text()).get("status") == "complete" for p in records
        ),
        "message": (errors[-1][7:] if errors else text.strip()[-200:])[:160],
    }
    problems = []
    if r.returncode != 2:
        problems.append(f"exit status {r.returncode}, not 2")
    if not (errors and re.search(match, errors[-1])):
        problems.append(f"no 'error:' line matching /{match}/")
    if measured["traceback"]:
        problems.append("a traceback was shown")
    if measured["cluster_started"]:
        problems.append("a Dask cluster was started before the refusal")
    if records:
        problems.append(f"run records were written before the refusal: {records}")
    if problems:
        problems.append("output tail:\n" + text[-3000:])
    return measured, problems
