"""Constant-memory claim of DEQ-Unmix: training peak memory vs solver iterations.

``python -m benchmarks.unmix_memory`` runs one training step (forward + backward) of DEQ-Unmix
with implicit differentiation at 10, 20 and 40 solver iterations, and of an unrolled network of
the same depth (the same map applied 10/20/40 times with autograd through every layer, an
SNMF-Net-style unrolled projected-gradient network), each in a fresh subprocess. The figure is
the peak RSS of the step (VmHWM, reset just before it) minus the RSS just before it (MiB). Data: a real scene (Jasper Ridge
from the shared data folder, or the shipped Samson crop with ``--crop``), tiled into a batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import peak_rss_since_reset_mib, reset_peak_rss
from pipeline.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]
CROP = ROOT / "tests" / "data" / "unmix" / "unmix_crops.npz"


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _load(scene: str, data: Path) -> Any:
    import numpy as np

    if scene == "crop":
        return np.load(CROP)["samson_cube"]
    from workers.unmix.evaluate import load_jasper, load_samson

    case = load_jasper(data) if scene == "jasper" else load_samson(data)
    return case.cube.astype(np.float32)


def child(mode: str, iters: int, scene: str, data: Path, batch: int, size: int) -> dict[str, Any]:
    """One training step in this (fresh) process; returns the peak-RSS increase in MiB."""
    import numpy as np
    import torch

    from workers.unmix.classical import vca
    from workers.unmix.deq_unmix import DEQUnmix, UnrolledUnmix

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cube = _load(scene, data)
    L, H, W = cube.shape
    s = min(size, H, W)
    E0, _ = vca(cube.reshape(L, -1).astype(np.float64), 3 if scene != "jasper" else 4, seed=0)
    model = DEQUnmix(
        torch.from_numpy(np.clip(E0, 0, None).astype(np.float32)),
        max_iter=iters,
        backward_max_iter=iters,
        tol=1e-12,
    )
    torch.nn.init.normal_(model.net.out.weight, std=1e-2)  # a non-trivial (trained-like) net
    rng = np.random.default_rng(0)
    tiles = []
    for _ in range(batch):
        y0, x0 = int(rng.integers(0, H - s + 1)), int(rng.integers(0, W - s + 1))
        tiles.append(cube[:, y0 : y0 + s, x0 : x0 + s])
    Y = torch.from_numpy(np.stack(tiles))
    net = UnrolledUnmix(model, iters) if mode == "unrolled" else model
    # warm-up step so that allocator pools and lazy inits are in the baseline
    for step in range(2):
        if step == 1:
            peak0 = peak_rss_since_reset_mib()
            base = _rss_mib()
            reset_peak_rss()
        t0 = time.perf_counter()
        out = net(Y)
        A = out[0] if isinstance(out, tuple) else out
        loss = ((model.reconstruct(A) - Y) ** 2).mean()
        loss.backward()
        dt = time.perf_counter() - t0
    peak = peak_rss_since_reset_mib()
    return {
        "mode": mode,
        "iterations": iters,
        "peak_rss_mib": peak,
        "baseline_rss_mib": base,
        "step_peak_increase_mib": max(peak - base, 0.0),
        "peak_before_step_mib": peak0,
        "step_time_s": dt,
        "batch": batch,
        "tile": s,
        "bands": L,
    }


def measure(
    mode: str,
    iters: int,
    *,
    scene: str = "jasper",
    data: Path | None = None,
    batch: int = 4,
    size: int = 64,
) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter and return its record."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.unmix_memory",
        "--child",
        mode,
        str(iters),
        "--scene",
        scene,
        "--batch",
        str(batch),
        "--size",
        str(size),
    ]
    if data is not None:
        cmd += ["--data", str(data)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {mode!r}/{iters!r} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "ITERS"))
    ap.add_argument("--scene", default="jasper", choices=["jasper", "samson", "crop"])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--iters", default="10,20,40")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "unmix_memory.json"
    )
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks" / "unmix.md")
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.scene, a.data, a.batch, a.size)))
        return
    import torch

    rows = [
        measure(mode, int(k), scene=a.scene, data=a.data, batch=a.batch, size=a.size)
        for mode in ("implicit", "unrolled")
        for k in a.iters.split(",")
    ]
    cmd = "python -m benchmarks.unmix_memory " + " ".join(sys.argv[1:] if argv is None else argv)
    rec = {
        "command": cmd.strip(),
        "device": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "scene": a.scene,
        "rows": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rec, indent=1))
    a.md.parent.mkdir(parents=True, exist_ok=True)
    _write_md(rec, a.md)
    for r in rows:
        print(
            f"{r['mode']:9s} {r['iterations']:3d} it: +{r['step_peak_increase_mib']:.1f} MiB, {r['step_time_s']:.2f} s"
        )


def _write_md(rec: dict[str, Any], path: Path) -> None:
    """Write (or replace) the memory section of docs/benchmarks/unmix.md."""
    lines = [
        "## Training memory: implicit differentiation vs unrolled",
        "",
        f"Command: `{rec['command']}`  ",
        f"Device: {rec['device']} ({rec['cpu_count']} cores), "
        f"torch {rec['torch']}, Python {rec['python']}; scene `{rec['scene']}`, batch "
        f"{rec['rows'][0]['batch']} tiles of {rec['rows'][0]['tile']}² px × {rec['rows'][0]['bands']} bands.",
        "",
        "Peak RSS increase of one training step (forward + backward) over the RSS just before it, "
        "each in a fresh process (MiB):",
        "",
        "| solver iterations | implicit (DEQ) | unrolled (same depth) | implicit step time (s) | unrolled step time (s) |",
        "|---|---|---|---|---|",
    ]
    by = {(r["mode"], r["iterations"]): r for r in rec["rows"]}
    for k in sorted({r["iterations"] for r in rec["rows"]}):
        i, u = by[("implicit", k)], by[("unrolled", k)]
        lines.append(
            f"| {k} | {i['step_peak_increase_mib']:.1f} | {u['step_peak_increase_mib']:.1f} | "
            f"{i['step_time_s']:.2f} | {u['step_time_s']:.2f} |"
        )
    section = "\n".join(lines) + "\n"
    text = path.read_text() if path.exists() else "# DEQ-Unmix benchmarks\n\n"
    start = text.find("## Training memory")
    if start >= 0:
        end = text.find("\n## ", start + 5)
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    main()
