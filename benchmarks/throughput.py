"""Model throughput (megavoxels/s), FLOPs per voxel and achieved vs peak FLOP/s.

Every model runs on the same real pixels (a fully valid crop of the demo mosaic, good bands):
DECSC (``denoise_cube``), DEQ-Unmix (``apply_fit`` of a per-scene fit), and the classical
anchors FastHyDe, BM4D (on a smaller crop: it is slow) and VCA+FCLS. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` on the same call (matmul/conv/attention only;
element-wise ops are not counted, so the figure is a lower bound). Peak FLOP/s is estimated from
a large float32 matmul timed in the same run: a measured ceiling, not a datasheet number.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks.data import read_cube
from benchmarks.harness import Section, Target, best_of, mvox_per_s
from benchmarks.models import DEFAULT_SUBSPACE, denoiser
from benchmarks.plan import SizePlan


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def peak_matmul(n: int, device: str, threads: int | None) -> dict[str, Any]:
    """GFLOP/s of an ``n×n`` float32 matmul (best of 3) with ``threads`` torch threads."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device)
        b = torch.randn(n, n, generator=g).to(device)
        (a @ b).sum().item()  # warm up
        _sync(device)

        def run() -> None:
            (a @ b)
            _sync(device)

        s, _ = best_of(run, 5)
    finally:
        torch.set_num_threads(old)
    return {
        "matmul": f"{n}×{n} float32",
        "threads": threads or old,
        "seconds": s,
        "gflop_s": 2 * n**3 / s / 1e9,
    }


def count_flops(fn: Any) -> tuple[int, Any]:
    """Total FLOPs counted while ``fn()`` runs, and its result."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        res = fn()
    return int(fc.get_total_flops()), res


def fit_unmixer(crop_scene: Any, plan: SizePlan) -> tuple[Any, float]:
    """A per-scene DEQ-Unmix fit on ``crop_scene`` with the plan's epochs; returns (fit, seconds)."""
    from workers.unmix.fit import fit_scene

    t0 = time.perf_counter()
    fit = fit_scene(
        crop_scene,
        4,
        seed=0,
        max_epochs=plan.unmix_fit_epochs,
        fit_tiles=4,
        fit_tile_size=min(plan.unmix_fit_tile, crop_scene.sizes["y"], crop_scene.sizes["x"]),
    )
    return fit, time.perf_counter() - t0


def crop_scene(crop: Any) -> Any:
    from benchmarks.data import demo_path
    from pipeline.readers import open_scene

    s = open_scene(demo_path()).isel(
        y=slice(crop.y0, crop.y0 + crop.h), x=slice(crop.x0, crop.x0 + crop.w)
    )
    if crop.bands is not None:
        s = s.isel(band=slice(0, crop.bands))
    return s.load()


def run(sec: Section, plan: SizePlan, device: str) -> None:
    """Fill ``sec`` with the throughput, FLOPs and peak tables."""
    import torch

    from workers.denoise.api import denoise_cube
    from workers.unmix.fit import apply_fit

    cores = torch.get_num_threads()
    peaks = [peak_matmul(plan.matmul_n, device, None if device != "cpu" else 1)]
    if device == "cpu" and cores > 1:
        peaks.append(peak_matmul(plan.matmul_n, device, cores))
    peak = max(p["gflop_s"] for p in peaks)
    sec.tables["Peak estimate (measured matmul)"] = peaks
    sec.values["peak_gflop_s"] = peak

    cube, _ = read_cube(plan.model_crop)
    b, h, w = cube.shape
    rows: list[dict[str, Any]] = []
    flops_rows: list[dict[str, Any]] = []

    # ---- DECSC
    t0 = time.perf_counter()
    model, wlabel = denoiser(device)
    load_s = time.perf_counter() - t0
    s, (out, st) = best_of(
        lambda: denoise_cube(
            model, cube, device=device, max_iter=plan.decsc_max_iter, subspace=DEFAULT_SUBSPACE
        ),
        plan.repeats,
    )
    rows.append(
        {
            "model": "DECSC (denoise_cube)",
            "weights/settings": wlabel,
            "pixels": h * w,
            "bands": b,
            "seconds": s,
            "mvox_s": mvox_per_s(h * w, b, s),
            "solver iterations (max)": st["iterations"],
            "converged": st["converged"],
            "spectral windows": st["windows"],
            "load_s": load_s,
            "threads": cores,
        }
    )
    sec.values["decsc_mvox_s"] = rows[-1]["mvox_s"]
    sec.values["decsc_weights"] = wlabel
    # FLOPs of one solver iteration on one 16×16 px tile with every band (all spectral windows),
    # scaled by the iterations of the timed run (the worst window's: an upper bound)
    sub = np.ascontiguousarray(cube[:, : min(16, h), : min(16, w)])
    fl1, _ = count_flops(lambda: denoise_cube(model, sub, device=device, max_iter=1))
    per_vox_it = fl1 / sub.size
    it = max(1, int(st["iterations"]))
    flops_rows.append(
        _flops_row(
            "DECSC, one solver iteration",
            int(per_vox_it * b * h * w),
            h * w * b,
            s / it,
            peak,
            f"counted on a {sub.shape[1]}×{sub.shape[2]} px tile, all {st['windows']} windows, 1 iteration",
        )
    )
    flops_rows.append(
        _flops_row(
            "DECSC, whole solve",
            int(per_vox_it * it * b * h * w),
            h * w * b,
            s,
            peak,
            f"× {it} iterations (worst window; upper bound)",
        )
    )

    # ---- DEQ-Unmix (fit on the crop, apply to the crop)
    scene = crop_scene(plan.model_crop)
    fit, fit_s = fit_unmixer(scene, plan)
    if plan.unmix_max_iter is not None:
        fit.config["eval_max_iter"] = plan.unmix_max_iter
    m = fit.model()
    s, (A, _rmse, ust) = best_of(lambda: apply_fit(fit, cube, model=m), plan.repeats)
    rows.append(
        {
            "model": "DEQ-Unmix (apply_fit)",
            "weights/settings": f"per-scene fit, P={fit.n_endmembers}, "
            f"{plan.unmix_fit_epochs} epochs ({fit_s:.1f} s)"
            + ("" if plan.unmix_max_iter is None else f", solver capped at {plan.unmix_max_iter}"),
            "pixels": h * w,
            "bands": b,
            "seconds": s,
            "mvox_s": mvox_per_s(h * w, b, s),
            "solver iterations (max)": ust["iterations"],
            "converged": ust["converged"],
            "threads": cores,
        }
    )
    sec.values["unmix_mvox_s"] = rows[-1]["mvox_s"]
    sec.values["unmix_fit_s"] = fit_s
    fl, _ = count_flops(lambda: apply_fit(fit, cube, model=m))
    flops_rows.append(
        _flops_row(
            "DEQ-Unmix", fl, h * w * b, s, peak, f"{ust['iterations']} iterations (per-pixel max)"
        )
    )

    # ---- classical anchors
    rows += _anchors(plan, fit.n_endmembers, cores)
    sec.tables[f"Throughput on {plan.model_crop.label} ({h}×{w} px × {b} good bands)"] = rows
    sec.tables["FLOPs per voxel and achieved vs peak FLOP/s"] = flops_rows
    sec.notes.append(
        f"Throughput = pixels × bands ÷ wall seconds (best of {plan.repeats}), one process, {cores} torch "
        "threads. DECSC's solver settings are the registry's eval settings"
        + (
            ""
            if plan.decsc_max_iter is None
            else f" capped at {plan.decsc_max_iter} iterations (smoke: not meaningful)"
        )
        + ". FLOPs from FlopCounterMode (matmul/conv/SDPA only), peak from the matmul above (measured, same run)."
    )
    dec = sec.values["decsc_mvox_s"]
    fh = next(
        (r["mvox_s"] for r in rows if r["model"].startswith("FastHyDe") and r.get("mvox_s")), None
    )
    if fh:
        sec.targets.append(
            Target(
                "DECSC throughput ÷ FastHyDe throughput",
                dec / fh,
                "informative (no goal)",
                None,
                f"on a {h}×{w} px crop, where FastHyDe's fixed per-cube cost weighs most; the "
                "whole-run comparison on the mosaic is the CLI-vs-FastHyDe section",
            )
        )


def _flops_row(
    name: str, flops: int, voxels: int, seconds: float, peak: float, what: str
) -> dict[str, Any]:
    gfs = flops / seconds / 1e9 if seconds > 0 else float("nan")
    return {
        "model": name,
        "counted": what,
        "GFLOP": flops / 1e9,
        "FLOP/voxel": flops / voxels,
        "achieved GFLOP/s": gfs,
        "peak GFLOP/s (matmul)": peak,
        "% of peak": 100 * gfs / peak,
    }


def _anchors(plan: SizePlan, p: int, cores: int) -> list[dict[str, Any]]:
    from workers.baselines import CaseInfo, availability, get_baseline
    from workers.unmix.classical import fcls, vca

    rows: list[dict[str, Any]] = []
    cube, _ = read_cube(plan.baseline_crop)
    b, h, w = cube.shape
    x = np.clip(cube, 0.0, 1.0).astype(np.float64)
    for name, label, crop in (
        ("fasthyde", "FastHyDe", plan.baseline_crop),
        ("bm4d", "BM4D", plan.bm4d_crop),
    ):
        ok, why = availability(name)
        if not ok:
            rows.append({"model": label, "weights/settings": why})
            continue
        data = (
            x
            if crop == plan.baseline_crop
            else np.clip(read_cube(crop)[0], 0, 1).astype(np.float64)
        )
        bb, hh, ww = data.shape
        info = CaseInfo("gauss30", np.full(bb, 30 / 255))
        bl = get_baseline(name)
        s, _ = best_of(lambda bl=bl, data=data, info=info: bl.denoise(data, info), plan.repeats)
        note = bl.settings + ("; timed on a smaller crop (BM4D is slow)" if name == "bm4d" else "")
        rows.append(
            {
                "model": label,
                "weights/settings": f"{note}; σ=30/255",
                "pixels": hh * ww,
                "bands": bb,
                "seconds": s,
                "mvox_s": mvox_per_s(hh * ww, bb, s),
                "threads": cores,
                "crop": crop.label,
            }
        )
    Y = cube.reshape(b, -1).astype(np.float64)
    t0 = time.perf_counter()
    E, _ = vca(Y, p, seed=0)
    t1 = time.perf_counter()
    fcls(Y, np.clip(E, 0, None))
    t2 = time.perf_counter()
    rows.append(
        {
            "model": "VCA + FCLS",
            "weights/settings": f"P={p}; VCA {t1 - t0:.2f} s, FCLS {t2 - t1:.2f} s",
            "pixels": h * w,
            "bands": b,
            "seconds": t2 - t0,
            "mvox_s": mvox_per_s(h * w, b, t2 - t0),
            "threads": cores,
        }
    )
    return rows
