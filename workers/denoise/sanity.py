"""Quick sanity metric of the shipped DECSC weights (not the protocol evaluation harness).

``python -m workers.denoise.sanity`` prints MPSNR (dB, output clamped to [0, 1]) of the noisy
input and of the DECSC output on a held-out CAVE scene crop and on Jasper Ridge (the project's
denoising test scene, never trained on), with seeded protocol noise, plus solver stats and time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.noise import add_noise

from .api import denoise_cube, load_denoiser
from .train import HELD_OUT_CAVE, load_cave


def _mpsnr(x: np.ndarray, ref: np.ndarray) -> float:
    mse = ((np.clip(x, 0, 1) - ref) ** 2).reshape(x.shape[0], -1).mean(1)
    return round(float(np.mean(10 * np.log10(1 / np.maximum(mse, 1e-12)))), 2)


def jasper(data: Path) -> np.ndarray:
    """Jasper Ridge as (198, 100, 100) in [0, 1] (min-max over the whole cube)."""
    import scipy.io as sio

    y = sio.loadmat(data / "jasper_ridge" / "Jasper.mat")["Y"].astype(np.float32)
    cube = y.T.reshape(100, 100, -1, order="F").transpose(2, 0, 1)
    return (cube - cube.min()) / (cube.max() - cube.min())


def demo_timing(path: Path, tile: int = 96, halo: int = 16, max_iter: int | None = None) -> dict:
    """Wall time of DECSC over the EnMAP demo scene, tile by tile (core ``tile``, ``halo`` context),
    good bands only, all-nodata tiles skipped; the tile engine's own numbers live in benchmarks/."""
    import rasterio

    with rasterio.open(path) as src:
        a = src.read().astype(np.float32)
        nodata = src.nodata
    a[a == nodata] = np.nan
    good = np.isfinite(a).any(axis=(1, 2))
    cube = a[good] / 1e4
    model = load_denoiser()
    _, h, w = cube.shape
    t0 = time.perf_counter()
    worst = {"iterations": 0, "residual": 0.0, "converged": True}
    tiles = 0
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            ys, xs = max(0, y0 - halo), max(0, x0 - halo)
            sub = cube[:, ys : min(h, y0 + tile + halo), xs : min(w, x0 + tile + halo)]
            if not np.isfinite(sub).all(axis=0).any():
                continue
            _, st = denoise_cube(model, sub, max_iter=max_iter)
            tiles += 1
            worst = {"iterations": max(worst["iterations"], st["iterations"]),
                     "residual": max(worst["residual"], st["residual"]),
                     "converged": worst["converged"] and st["converged"]}
    return {"scene": str(path), "shape": list(cube.shape), "tile": tile, "halo": halo, "tiles": tiles,
            "seconds": round(time.perf_counter() - t0, 1), **worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--cases", nargs="+", default=["gauss30", "band[0,55]", "mixture"])
    ap.add_argument("--max-iter", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--demo", type=Path, default=None, help="time the EnMAP demo scene instead")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.demo is not None:
        print(json.dumps(demo_timing(a.demo, max_iter=a.max_iter)))
        return
    model = load_denoiser(weights=a.weights)
    scenes = {
        f"cave:{HELD_OUT_CAVE[0].split('_ms')[0]}[64:192,64:192]": load_cave(a.data / "cave" / HELD_OUT_CAVE[0])[:, 64:192, 64:192],
        "jasper_ridge": jasper(a.data),
    }
    rows = []
    for name, clean in scenes.items():
        for case in a.cases:
            noisy = add_noise(clean, case, np.random.default_rng(0))
            t = time.perf_counter()
            out, st = denoise_cube(model, noisy, max_iter=a.max_iter)
            rows.append({"scene": name, "case": case, "shape": list(clean.shape), "mpsnr_noisy": _mpsnr(noisy, clean),
                         "mpsnr_decsc": _mpsnr(out, clean), "seconds": round(time.perf_counter() - t, 1), **st})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
