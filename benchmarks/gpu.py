"""GPU section of ``hyperdeq bench --device cuda``: throughput, busy fraction, largest tile, estimates.

* throughput of DECSC (``denoise_cube``) on the model crop, timed with CUDA events;
* GPU busy fraction: NVML utilisation sampled during the run when ``pynvml`` is installed,
  otherwise the sum of CUDA kernel times (``torch.profiler``) ÷ wall time;
* largest square tile that fits: doubling tile sides until ``torch.cuda.OutOfMemoryError``,
  with the peak allocated memory of each;
* estimated time for a 1000×1000×224 scene at the best measured throughput;
* mixed precision (bfloat16 autocast): speed-up and PSNR of its output against float32
  (kept only where the PSNR stays above 50 dB).

Without a CUDA device the section is skipped with that reason: nothing is estimated from CPU.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from benchmarks.data import read_cube
from benchmarks.harness import Section, gpu_name, mvox_per_s
from benchmarks.models import denoiser
from benchmarks.plan import SizePlan


def _nvml_sampler() -> tuple[Any, Any] | None:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # noqa: BLE001 - pynvml missing or no driver: fall back to the profiler
        return None
    samples: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu))
            time.sleep(0.05)

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    return (stop, th), samples


def run(sec: Section, plan: SizePlan, device: str) -> None:
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        sec.status = "skipped"
        sec.notes.append(
            "No CUDA device in this run: GPU tables are pending a GPU session "
            "(`hyperdeq bench --device cuda` records them with the GPU name)."
        )
        return
    from workers.denoise.api import denoise_cube

    dev = "cuda"
    model, wlabel = denoiser(dev)
    cube, _ = read_cube(plan.model_crop)
    b, h, w = cube.shape
    denoise_cube(model, cube[:, :16, :16], device=dev)  # warm-up (cuDNN autotune, allocator)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sampler = _nvml_sampler()
    t0 = time.perf_counter()
    e0.record()
    _out32, st = denoise_cube(model, cube, device=dev, max_iter=plan.decsc_max_iter)
    e1.record()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    busy_how = "NVML utilisation (mean of samples)"
    if sampler is not None:
        (stop, th), samples = sampler
        stop.set()
        th.join()
        busy = float(np.mean(samples)) / 100 if samples else float("nan")
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            tp = time.perf_counter()
            denoise_cube(model, cube, device=dev, max_iter=plan.decsc_max_iter)
            torch.cuda.synchronize()
            pw = time.perf_counter() - tp
        kern_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
        busy = kern_us / 1e6 / pw
        busy_how = "CUDA kernel time (torch.profiler) ÷ wall"
    thr = mvox_per_s(h * w, b, wall)

    # largest tile that fits
    sizes = []
    side = 64
    best_thr = thr
    while side <= 2048:  # beyond this a 20-iteration solve takes minutes per tile
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        reps = (1, -(-side // h), -(-side // w))
        rep = np.ascontiguousarray(np.tile(cube, reps)[:, :side, :side], dtype=np.float32)
        try:
            ts = time.perf_counter()
            denoise_cube(model, rep, device=dev, max_iter=plan.decsc_max_iter)
            torch.cuda.synchronize()
            s = time.perf_counter() - ts
        except torch.cuda.OutOfMemoryError:
            sizes.append({"tile side": side, "fits": False})
            break
        t_thr = mvox_per_s(side * side, b, s)
        best_thr = max(best_thr, t_thr)
        sizes.append({"tile side": side, "fits": True, "seconds": s, "mvox_s": t_thr,
                      "peak GiB": torch.cuda.max_memory_allocated() / 2**30})
        side *= 2
    torch.cuda.empty_cache()

    # mixed precision, on one spectral window through the module (denoise_cube returns float32 numpy)
    amp_s = psnr = float("nan")
    amp_err = ""
    try:
        win = torch.from_numpy(np.nan_to_num(cube[: model.cfg.bands])).to(dev)[None]
        ta = time.perf_counter()
        ref, _ = model(win, max_iter=plan.decsc_max_iter)
        torch.cuda.synchronize()
        fp32_s = time.perf_counter() - ta
        ta = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low, _ = model(win, max_iter=plan.decsc_max_iter)
        torch.cuda.synchronize()
        amp_s = time.perf_counter() - ta
        mse = float(((ref.float() - low.float()) ** 2).mean())
        psnr = 10 * float(np.log10(1.0 / mse)) if mse > 0 else float("inf")
        amp_speedup = fp32_s / amp_s
    except Exception as exc:  # noqa: BLE001 - reported: some ops may not support bf16
        amp_err = f"{type(exc).__name__}: {exc}"
        amp_speedup = float("nan")
    big = 1000 * 1000 * 224
    sec.tables[f"GPU: {gpu_name()}"] = [{
        "model": "DECSC", "weights": wlabel, "crop": plan.model_crop.label, "seconds (events)": e0.elapsed_time(e1) / 1e3,
        "wall s": wall, "mvox_s": thr, "GPU busy fraction": busy, "busy measured by": busy_how,
        "solver iterations": st["iterations"], "best mvox_s (any tile)": best_thr,
        "est. 1000×1000×224 scene s": big / 1e6 / best_thr,
        "bf16 autocast s (one window)": amp_s, "bf16 speed-up": amp_speedup, "bf16 vs fp32 PSNR dB": psnr,
        "bf16 kept": bool(psnr >= 50) if not amp_err else amp_err,
    }]
    sec.tables["Largest tile that fits"] = sizes
    sec.values.update({"gpu": gpu_name(), "gpu_mvox_s": thr, "gpu_busy": busy})
