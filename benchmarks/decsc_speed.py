"""DECSC per-tile speed before/after issue 22 (folded conv + old solver vs conv3d + batched solver).

``python -m benchmarks.decsc_speed [--size 64] [--arch shipped] [--reps 2] [--threads 1]``

Runs ``workers.denoise.api.denoise_cube`` (the model stage of one tile: spectral windows, DECSC
with its Anderson solver, blending, band guard; no subspace pass) on a real, fully valid window of
the EnMAP Potsdam demo mosaic (218 good bands), once with the current code and once with the old
code path restored: the folded 3D convolution and the old solver are the reference copies kept in
``tests/workers/test_decsc_equivalence.py`` (patched in for the "before" rows only). Reported per
variant (best of ``--reps``, CPU time of this thread, so other processes on a shared machine
count less than in wall time): seconds per tile, MVox/s (pixels x bands / s), the time spent in
map evaluations, in the solver's own bookkeeping (solve minus map), and that bookkeeping as a
share of the solve and of the whole model stage. The outputs of both variants are compared.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np


@contextlib.contextmanager
def _old_code() -> Iterator[None]:
    import workers.denoise.decsc as decsc
    import workers.deq.fixed_point as fp
    from tests.workers.test_decsc_equivalence import _conv3d_folded, _old_solve

    def old_solve(f: Any, z0: Any, *, method: str, check_every: int = 1, **kw: Any) -> Any:
        assert method == "anderson", method  # the old solver tested every iteration
        return _old_solve(f, z0, **kw)

    saved = decsc.conv3d_banded, fp.solve
    decsc.conv3d_banded, fp.solve = _conv3d_folded, old_solve
    try:
        yield
    finally:
        decsc.conv3d_banded, fp.solve = saved


def _timed(model: Any, cube: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """One ``denoise_cube`` call with CPU-time counters around the solves and map evaluations."""
    import workers.deq.fixed_point as fp
    from workers.denoise.api import denoise_cube

    acc = {"solve": 0.0, "map": 0.0, "map_calls": 0}
    inner_solve = fp.solve
    map_fwd = model.map.forward

    def solve(f: Any, z0: Any, **kw: Any) -> Any:
        t = time.thread_time()
        try:
            return inner_solve(f, z0, **kw)
        finally:
            acc["solve"] += time.thread_time() - t

    def fwd(z: Any, x: Any) -> Any:
        t = time.thread_time()
        try:
            return map_fwd(z, x)
        finally:
            acc["map"] += time.thread_time() - t
            acc["map_calls"] += 1

    fp.solve, model.map.forward = solve, fwd
    try:
        t0, w0 = time.thread_time(), time.perf_counter()
        out, _ = denoise_cube(model, cube, guard="apply", subspace=0)
        acc["total"], acc["wall"] = time.thread_time() - t0, time.perf_counter() - w0
    finally:
        fp.solve = inner_solve
        del model.map.forward  # back to the class method
    return out, acc


def run(size: int = 64, arch: str = "shipped", reps: int = 2, threads: int = 1) -> str:
    import torch

    from benchmarks.data import Crop, read_cube
    from workers.denoise.api import load_denoiser

    torch.set_num_threads(threads)
    cube, _ = read_cube(Crop(0, 0, size, size))
    cube = np.ascontiguousarray(cube, dtype=np.float32)
    model = load_denoiser(arch=arch)
    best: dict[str, dict[str, float]] = {}
    outs: dict[str, np.ndarray] = {}
    for _ in range(reps):
        for name in ("before", "now"):
            with _old_code() if name == "before" else contextlib.nullcontext():
                out, acc = _timed(model, cube)
            outs[name] = out
            if name not in best or acc["total"] < best[name]["total"]:
                best[name] = acc
    vox = cube.size
    rows = [
        f"DECSC model stage per tile: demo[0:{size}, 0:{size}], {cube.shape[0]} bands, {arch} weights, "
        f"{threads} torch thread(s), best of {reps} (thread CPU time)\n",
        "| code | s / tile | MVox/s | wall s | map evals | map s | solver bookkeeping s | bookkeeping / solve "
        "| bookkeeping / model stage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in best.items():
        over = a["solve"] - a["map"]
        rows.append(
            f"| {name} | {a['total']:.2f} | {vox / a['total'] / 1e6:.3f} | {a['wall']:.2f} | {a['map_calls']} "
            f"| {a['map']:.2f} | {over:.2f} | {100 * over / a['solve']:.1f} % | {100 * over / a['total']:.1f} % |"
        )
    diff = float(np.nanmax(np.abs(outs["now"] - outs["before"])))
    rows.append(
        f"\nspeed-up {best['before']['total'] / best['now']['total']:.2f}x; max |now - before| = {diff:.2e}"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--arch", default="shipped", choices=("shipped", "full"))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    print(run(a.size, a.arch, a.reps, a.threads))


if __name__ == "__main__":
    main()
