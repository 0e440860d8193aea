"""The one environment probe: host, CPU, memory, load, package versions, code version.

Run records, benchmark reports and evaluation reports all describe where they ran with these
functions. The GPU's name needs torch, so the caller passes it in (``workers.infer.gpu_name``).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: packages whose versions a run record lists
RUN_PACKAGES = (
    "hyperdeq",
    "numpy",
    "xarray",
    "zarr",
    "dask",
    "distributed",
    "rasterio",
    "rioxarray",
    "torch",
    "prefect",
    "pystac",
    "scipy",
)


def package_versions(names: Sequence[str] = RUN_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when missing)."""
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def code_version() -> str:
    """``git describe --always --dirty`` of the source tree, or the package version."""
    return (
        _git("describe", "--always", "--dirty", "--tags")
        or package_versions(("hyperdeq",)).get("hyperdeq")
        or "unknown"
    )


def git_commit() -> str | None:
    """Short hash of the checked-out commit (None outside a checkout)."""
    return _git("rev-parse", "--short", "HEAD")


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (the platform's string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        return None


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: how shared the machine was while measuring."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def host_info(gpu: str | None = None) -> dict[str, Any]:
    """Where a run ran: host name, platform, Python, CPU, cores, memory and the GPU's name."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib(),
        "gpu": gpu,
    }
