"""Constant-memory claim: implicit-differentiation training memory does not grow with iterations."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from benchmarks.unmix_memory import measure

#: allocator granularity: peak RSS of one step moves by a few MiB between identical runs
SLACK_MIB = 4.0


def test_implicit_training_memory_flat_vs_unrolled():
    kw = dict(scene="crop", batch=16, size=32)
    # each measurement is its own fresh process (most of its time is importing torch): run the
    # three side by side
    with ThreadPoolExecutor(3) as pool:
        runs = [
            pool.submit(measure, mode, it, **kw)
            for mode, it in (("implicit", 10), ("implicit", 40), ("unrolled", 40))
        ]
        i10, i40, u40 = (r.result()["step_peak_increase_mib"] for r in runs)
    msg = f"implicit@10 {i10:.1f} MiB, implicit@40 {i40:.1f} MiB, unrolled@40 {u40:.1f} MiB"
    assert i40 <= 1.2 * i10 + SLACK_MIB, msg
    # the unrolled network of the same depth keeps every layer: it must cost clearly more
    assert u40 > 2 * i40, msg
