"""Training memory of a DEQ (implicit differentiation) vs an unrolled network of the same depth.

``python -m benchmarks.deq_memory`` runs, for 10, 20 and 40 solver iterations, one training
step (forward + backward) of the DECSC fixed-point map on a real CAVE crop, each in a fresh
subprocess, and records the peak resident memory above the process's resident memory just
before the step (``ru_maxrss`` after minus RSS before). Implicit: the solver runs without
autograd, one re-attached map application plus the adjoint fixed point (solved with the same
number of iterations). Unrolled: the same map applied ``n`` times with autograd. Writes
``benchmarks/results/deq_memory.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "deq_memory.json"

_CHILD = r"""
import json, resource, sys, time
import numpy as np, psutil, torch
torch.set_num_threads(1)
from workers.denoise.decsc import DECSC, DECSCConfig, estimate_sigma
mode, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = DECSC(DECSCConfig())
with np.load(sys.argv[4]) as d:
    clean = (d["cube"].astype(np.float32) / float(d["full_scale"]))[:, :size, :size]
rng = np.random.default_rng(0)
y = torch.from_numpy(clean + rng.normal(0, 30 / 255, clean.shape).astype(np.float32))[None].repeat(2, 1, 1, 1)
sig = estimate_sigma(y)
x = torch.cat([y, sig[:, :, None, None].expand_as(y)], 1)
fmap = model.map
from benchmarks.deq_memory import training_step
with torch.no_grad():  # warm-up: library initialisation is not training memory
    fmap(x.new_zeros(x.shape[0], sum(fmap.sizes(size, size))), x)
rss0 = psutil.Process().memory_info().rss
t0 = time.perf_counter()
training_step(fmap, x, size, mode, n)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"mode": mode, "iterations": n, "peak_delta_mib": round((peak - rss0) / 2**20, 1),
                  "seconds": round(dt, 2)}))
"""


def training_step(fmap: Any, x: Any, size: int, mode: str, n: int) -> None:
    """One training step (forward + backward) of the DECSC map on ``x`` with ``n`` solver iterations.

    ``implicit``: the DEQ solver without autograd, then the adjoint fixed point (same iteration
    count); ``unrolled``: the map applied ``n`` times with autograd. Loss: mean square of the synthesis.
    """
    from workers.deq import DEQFixedPoint

    def init(v: Any) -> Any:
        return v.new_zeros(v.shape[0], sum(fmap.sizes(size, size)))

    if mode == "implicit":
        deq = DEQFixedPoint(
            fmap, init=init, tol=1e-12, max_iter=n, backward_tol=1e-12, backward_max_iter=n
        )
        z, _st = deq(x)
    else:
        z = init(x)
        for _ in range(n):
            z = fmap(z, x)
    fmap.synth(z, size, size).square().mean().backward()


def run(iterations: list[int], size: int) -> dict:
    crop = ROOT / "tests" / "data" / "decsc" / "cave_balloons_48x48x31.npz"
    rows = []
    for n in iterations:
        for mode in ("implicit", "unrolled"):
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, mode, str(n), str(size), str(crop)],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    import torch

    from pipeline.environment import cpu_model

    cpu = cpu_model()
    return {
        "command": "python -m benchmarks.deq_memory" + (f" --size {size}" if size != 24 else ""),
        "device": f"CPU: {cpu}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": 1,
        "input": f"2 x 31 x {size} x {size} CAVE balloons crop + gauss30 noise",
        "model": "DECSC map, shipped CPU config",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "results": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, nargs="+", default=[10, 20, 40])
    ap.add_argument("--size", type=int, default=24)
    ap.add_argument("--out", type=Path, default=RESULT)
    a = ap.parse_args()
    res = run(a.iterations, a.size)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print("| iterations | implicit DEQ peak (MiB) | unrolled peak (MiB) |\n|---|---|---|")
    by = {(r["mode"], r["iterations"]): r for r in res["results"]}
    for n in a.iterations:
        print(
            f"| {n} | {by[('implicit', n)]['peak_delta_mib']} | {by[('unrolled', n)]['peak_delta_mib']} |"
        )


if __name__ == "__main__":
    main()
