"""Process memory allocator settings for model work (glibc ``mallopt``).

The models allocate and free tensors of several MB per operation. With glibc's defaults (and
Dask's nanny, which sets ``MALLOC_TRIM_THRESHOLD_=65536`` for its workers) each such block is
mapped from the OS and returned on free, so every tensor costs fresh page faults: on the
development CPU a third of DECSC's time was system time. :func:`tune_allocator` keeps freed memory
in the process for reuse instead (blocks below 1 GiB come from the heap, up to 1 GiB of free heap
is kept): the same results, 1.7x faster on one thread (``docs/benchmarks.md``). The cost is that
a process keeps its high-water mark of freed memory (at most 1 GiB more) until it exits.
"""

from __future__ import annotations

import ctypes
import sys
import threading

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

#: bytes: allocations below this come from the heap; free heap kept below this
KEEP_BYTES = 1 << 30
TOP_PAD_BYTES = 256 << 20

_LOCK = threading.Lock()
_STATE: dict[str, bool] = {}


def tune_allocator() -> bool:
    """Apply the settings once per process; True when they are in effect (glibc on Linux)."""
    with _LOCK:
        if "done" not in _STATE:
            _STATE["done"] = _apply()
        return _STATE["done"]


def _apply() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, KEEP_BYTES),
            (_M_TRIM_THRESHOLD, KEEP_BYTES),
            (_M_TOP_PAD, TOP_PAD_BYTES),
        )
    )
