"""Constant-memory claim: implicit-differentiation training memory does not grow with iterations."""

from __future__ import annotations

from benchmarks.unmix_memory import measure


def test_implicit_training_memory_flat_vs_unrolled():
    kw = dict(scene="crop", batch=16, size=32)
    i10 = measure("implicit", 10, **kw)
    i40 = measure("implicit", 40, **kw)
    u40 = measure("unrolled", 40, **kw)
    assert i40["step_peak_increase_mib"] <= 1.2 * i10["step_peak_increase_mib"]
    # the unrolled network of the same depth keeps every layer: it must cost clearly more
    assert u40["step_peak_increase_mib"] > 2 * i40["step_peak_increase_mib"]
