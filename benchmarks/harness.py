"""Benchmark harness: environment capture, timing, result sections, markdown and JSON output.

Every section of ``hyperdeq bench`` is a :class:`Section`: a title, the exact command that
produced it, the device it ran on, one or more tables (lists of row dicts), notes, and targets
(a measured value against the project's goal, met or not). The whole run is one JSON file
(``benchmarks/results/bench_<size>_<device>.json``) and one markdown report.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.environment import cpu_model, git_commit, load_average, memory_gib
from pipeline.errors import ConfigError
from workers.infer import gpu_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
SIZES = ("smoke", "default", "large")
DEVICES = ("cpu", "cuda")


# ---------------------------------------------------------------------------- environment
def versions() -> dict[str, str]:
    """Versions of the packages whose speed the numbers depend on."""
    from pipeline.environment import package_versions

    names = (
        "torch",
        "numpy",
        "scipy",
        "dask",
        "distributed",
        "zarr",
        "xarray",
        "rasterio",
        "hyde-images",
        "bm4d",
        "prefect",
    )
    return {
        "python": platform.python_version(),
        **{k: v or "missing" for k, v in package_versions(names).items()},
    }


def environment(device: str) -> dict[str, Any]:
    """Where and with what a run was measured."""
    try:
        import torch

        threads = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        threads = None
    mem_gb = memory_gib()
    return {
        "device": device,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": mem_gb,
        "gpu": gpu_name(),
        "torch_threads": threads,
        "load_average_at_start": load_average(),
        "platform": platform.platform(),
        "versions": versions(),
        "git_commit": git_commit(),
        "command": command_line(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def command_line() -> str:
    """The command as typed (``hyperdeq bench ...`` or ``python -m benchmarks ...``)."""
    argv = list(sys.argv)
    prog = Path(argv[0]).name if argv else "python"
    if prog in ("__main__.py", "-m"):
        prog = "python -m benchmarks"
    elif prog == "hyperdeq":
        prog = "hyperdeq"
    from pipeline.provenance import portable

    return portable(" ".join([prog, *[shlex.quote(a) for a in argv[1:]]]))


# ---------------------------------------------------------------------------- measuring
def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """``with stopwatch() as t: ...`` then ``t["s"]`` holds the wall time in seconds."""
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - t0


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Smallest wall time of ``repeats`` calls (the least disturbed by other load) and the last result."""
    best = math.inf
    res = None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t0)
    return best, res


def mvox_per_s(pixels: int, bands: int, seconds: float) -> float:
    """Throughput in megavoxels per second (pixels × bands / s / 1e6)."""
    return pixels * bands / seconds / 1e6 if seconds > 0 else float("nan")


# ---------------------------------------------------------------------------- results
@dataclass
class Target:
    """One goal of PROTOCOL.md / the issue: the measured value, the goal, and whether it is met."""

    name: str
    value: float | None
    goal: str
    met: bool | None
    why: str = ""


def peak_rss_since_reset_mib() -> float:
    """Peak RSS of this process since the last :func:`reset_peak_rss` (or since exec), MiB (VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line: peak memory cannot be measured here")


def reset_peak_rss() -> None:
    """Reset the peak-RSS counter (Linux ``clear_refs`` 5).

    ``ru_maxrss`` cannot be used for a child process: Linux carries the parent's RSS at fork into
    the child's ``ru_maxrss`` (also across exec), so a child spawned from a large process reports
    the parent's size.
    """
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


@dataclass
class Section:
    """One block of the report: tables plus the command and device they came from."""

    key: str
    title: str
    status: str = "ok"  # ok | skipped | failed | reused
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    wall_s: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return _clean(d)


def _clean(v: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, numpy scalars become Python numbers."""
    try:
        import numpy as np

        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
    except ImportError:
        pass
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


def run_section(
    key: str, title: str, fn: Callable[[Section], None], log: Callable[[str], None]
) -> Section:
    """Run one section body; a failure is recorded in the section (status ``failed``), never hidden."""
    sec = Section(key=key, title=title)
    log(f"[bench] {key}: {title} ...")
    t0 = time.perf_counter()
    try:
        fn(sec)
    except Exception as exc:  # noqa: BLE001 - recorded and reported, the other sections still run
        sec.status = "failed"
        sec.error = f"{type(exc).__name__}: {exc}"
        sec.notes.append("traceback: " + traceback.format_exc(limit=6).replace("\n", " | "))
    sec.wall_s = time.perf_counter() - t0
    log(f"[bench] {key}: {sec.status} in {sec.wall_s:.1f} s")
    return sec


# ---------------------------------------------------------------------------- markdown
def fmt(v: Any) -> str:
    """Compact human formatting for table cells."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        if a >= 0.001:
            return f"{v:.4f}"
        return f"{v:.2e}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def md_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table over the union of the rows' keys (first-seen order)."""
    if not rows:
        return "_(no rows)_\n"
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def section_markdown(sec: Section, env: dict[str, Any]) -> str:
    """One section as markdown, with the device and command beside its tables."""
    out = [f"### {sec.title}\n"]
    dev = env.get("gpu") if env.get("device") == "cuda" else env.get("cpu")
    out.append(
        f"_Command:_ `{env.get('command')}` · _device:_ {env.get('device')} ({dev}, "
        f"{env.get('cpu_cores')} cores) · _torch_ {env.get('versions', {}).get('torch')} · "
        f"_section wall time_ {sec.wall_s:.1f} s · _status_ **{sec.status}**\n"
    )
    if sec.error:
        out.append(f"**Error:** `{sec.error}`\n")
    for name, rows in sec.tables.items():
        if name:
            out.append(f"**{name}**\n")
        out.append(md_table(rows))
    if sec.targets:
        out.append("**Targets**\n")
        out.append(
            md_table(
                [
                    {
                        "target": t.name,
                        "measured": t.value,
                        "goal": t.goal,
                        "met": {True: "met", False: "MISSED", None: "n/a"}[t.met],
                        "why": t.why,
                    }
                    for t in sec.targets
                ]
            )
        )
    for n in sec.notes:
        if not n.startswith("traceback:"):
            out.append(f"- {n}")
    out.append("")
    return "\n".join(out)


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=1, sort_keys=False, default=str))
    os.replace(tmp, path)
    return path


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {list(choices)!r}")
    return value
