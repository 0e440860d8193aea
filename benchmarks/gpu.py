"""GPU section of ``hyperdeq bench --device cuda``: throughput, busy fraction, largest tile, estimates.

* throughput of DECSC (``denoise_cube``) on the model crop, timed with CUDA events;
* GPU busy fraction: NVML utilisation sampled during the run when ``pynvml`` is installed,
  otherwise the sum of CUDA kernel times (``torch.profiler``) ÷ wall time;
* largest square tile that fits: doubling tile sides until ``torch.cuda.OutOfMemoryError``,
  with the peak allocated memory of each;
* estimated time for a 1000×1000×224 scene at the best measured throughput;
* mixed precision (bfloat16 autocast): speed-up and PSNR of its output against float32
  (kept only where the PSNR stays above 50 dB);
* FLOPs per voxel (``FlopCounterMode``: matmul/conv/attention) and achieved vs peak FLOP/s, the
  peak measured with large float32, TF32 and bfloat16 matmuls on the same GPU;
* DEQ-Unmix throughput on the GPU, from a fit saved on the CPU machine (``UnmixFit.save``; path
  in ``HYPERDEQ_BENCH_UNMIX_FIT``), so the GPU machine needs no geospatial stack;
* DEQ training memory on the GPU (peak allocated): implicit differentiation vs an unrolled
  network of the same depth at 10/20/40 solver iterations.

Without a CUDA device the section is skipped with that reason: nothing is estimated from CPU.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from benchmarks.data import read_cube
from benchmarks.harness import Section, Target, gpu_name, mvox_per_s
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
    sizes: list[dict[str, Any]] = []
    side = 64
    best_thr = thr
    while side <= 2048:  # beyond this a 20-iteration solve takes minutes per tile
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        reps = (1, -(-side // h), -(-side // w))
        rep = np.ascontiguousarray(np.tile(cube, reps)[:, :side, :side], dtype=np.float32)
        tile_sampler = _nvml_sampler()
        try:
            ts = time.perf_counter()
            denoise_cube(model, rep, device=dev, max_iter=plan.decsc_max_iter)
            torch.cuda.synchronize()
            s = time.perf_counter() - ts
        except torch.cuda.OutOfMemoryError:
            sizes.append({"tile side": side, "fits": False})
            break
        finally:
            tile_busy = float("nan")
            if tile_sampler is not None:
                (t_stop, t_th), t_samples = tile_sampler
                t_stop.set()
                t_th.join()
                tile_busy = float(np.mean(t_samples)) / 100 if t_samples else float("nan")
        t_thr = mvox_per_s(side * side, b, s)
        best_thr = max(best_thr, t_thr)
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        sizes.append(
            {
                "tile side": side,
                "fits": True,
                "seconds": s,
                "mvox_s": t_thr,
                "peak GiB": peak_gib,
                "GPU busy (NVML)": tile_busy,
            }
        )
        if s > 15:  # the next size takes ~4x as long: estimate from memory ∝ area instead of trying
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            est = int(side * (0.9 * total / peak_gib) ** 0.5)
            sizes.append(
                {
                    "tile side": f"≈{est} (estimated)",
                    "fits": None,
                    "note": f"not run (a {2 * side}-px tile would take ~{4 * s:.0f} s); peak memory ∝ area → "
                    f"side × √(0.9 × {total:.0f} GiB ÷ {peak_gib:.2f} GiB)",
                }
            )
            break
        side *= 2
    torch.cuda.empty_cache()

    # mixed precision, on one spectral window through the module (denoise_cube returns float32 numpy)
    amp_s = psnr = float("nan")
    amp_err = ""
    try:
        win = torch.from_numpy(np.nan_to_num(cube[: model.cfg.bands])).to(dev)[None]
        model(win, max_iter=2)  # warm-up of both precisions: first bf16 calls pick kernels
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(win, max_iter=2)
        torch.cuda.synchronize()
        ta = time.perf_counter()
        ref, _ = model(win, max_iter=plan.decsc_max_iter)
        torch.cuda.synchronize()
        fp32_s = time.perf_counter() - ta
        ta = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low, _ = model(win, max_iter=plan.decsc_max_iter)
        torch.cuda.synchronize()
        amp_s = time.perf_counter() - ta
        mse = float(((ref.detach().float() - low.detach().float()) ** 2).mean())
        psnr = 10 * float(np.log10(1.0 / mse)) if mse > 0 else float("inf")
        amp_speedup = fp32_s / amp_s
    except Exception as exc:  # noqa: BLE001 - reported: some ops may not support bf16
        amp_err = f"{type(exc).__name__}: {exc}"
        amp_speedup = float("nan")
    big = 1000 * 1000 * 224
    sec.tables[f"GPU: {gpu_name()}"] = [
        {
            "model": "DECSC",
            "weights": wlabel,
            "crop": plan.model_crop.label,
            "seconds (events)": e0.elapsed_time(e1) / 1e3,
            "wall s": wall,
            "mvox_s": thr,
            "GPU busy fraction": busy,
            "busy measured by": busy_how,
            "solver iterations": st["iterations"],
            "best mvox_s (any tile)": best_thr,
            "est. 1000×1000×224 scene s": big / 1e6 / best_thr,
            "bf16 autocast s (one window)": amp_s,
            "bf16 speed-up": amp_speedup,
            "bf16 vs fp32 PSNR dB": psnr,
            "bf16 kept": bool(psnr >= 50) if not amp_err else amp_err,
        }
    ]
    sec.tables["Largest tile that fits"] = sizes
    sec.values.update({"gpu": gpu_name(), "gpu_mvox_s": thr, "gpu_busy": busy})
    sec.targets.append(
        Target(
            "GPU busy fraction (DECSC, model crop)",
            busy,
            "≥ 0.8",
            bool(busy >= 0.8),
            f"sampled while denoising the {plan.model_crop.label} crop ({busy_how})",
        )
    )
    steady = [
        r for r in sizes if r.get("fits") and np.isfinite(r.get("GPU busy (NVML)", float("nan")))
    ]
    if steady:
        big = steady[-1]
        sec.values["gpu_busy_steady"] = big["GPU busy (NVML)"]
        sec.targets.append(
            Target(
                "GPU busy fraction in steady state (largest tile run)",
                big["GPU busy (NVML)"],
                "≥ 0.8",
                bool(big["GPU busy (NVML)"] >= 0.8),
                f"NVML utilisation sampled through the {big['tile side']}-px tile",
            )
        )
    _flops(sec, model, cube, best_thr, st, plan)
    _unmixer(sec, cube)
    _train_memory(sec, cube)


def _sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def _gpu_peaks() -> list[dict[str, Any]]:
    """Measured matmul peaks (8192³, best of 5) in float32, TF32 and bfloat16."""
    import torch

    n = 8192
    rows: list[dict[str, Any]] = []
    for label, dtype, tf32 in (
        ("float32", torch.float32, False),
        ("TF32", torch.float32, True),
        ("bfloat16", torch.bfloat16, False),
    ):
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            a = torch.randn(n, n, device="cuda", dtype=dtype)
            b = torch.randn(n, n, device="cuda", dtype=dtype)
            a @ b
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                a @ b
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            rows.append(
                {"matmul": f"{n}³ {label}", "seconds": best, "TFLOP/s": 2 * n**3 / best / 1e12}
            )
            del a, b
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    torch.cuda.empty_cache()
    return rows


def _flops(
    sec: Section, model: Any, cube: np.ndarray, thr: float, st: dict, plan: SizePlan
) -> None:
    from benchmarks.throughput import count_flops
    from workers.denoise.api import denoise_cube

    peaks = _gpu_peaks()
    sec.tables["GPU peak estimate (measured matmul)"] = peaks
    sub = np.ascontiguousarray(cube[:, :16, :16])
    fl1, _ = count_flops(lambda: denoise_cube(model, sub, device="cuda", max_iter=1))
    per_vox_it = fl1 / sub.size
    it = max(1, int(st["iterations"]))
    achieved = per_vox_it * it * thr * 1e6 / 1e12  # TFLOP/s at the measured throughput
    sec.tables["GPU FLOPs per voxel and achieved vs peak"] = [
        {
            "model": "DECSC (float32), at the best tile size",
            "FLOP/voxel/iteration": per_vox_it,
            "iterations (worst window)": it,
            "FLOP/voxel": per_vox_it * it,
            "achieved TFLOP/s (upper bound)": achieved,
            **{
                f"% of {p['matmul'].split()[-1]} peak": 100 * achieved / p["TFLOP/s"] for p in peaks
            },
        }
    ]


def _unmixer(sec: Section, cube: np.ndarray, dev: str = "cuda") -> None:
    import json
    import os
    from pathlib import Path

    import torch

    d = os.environ.get("HYPERDEQ_BENCH_UNMIX_FIT")
    if not d or not Path(d).is_dir():
        sec.notes.append(
            "DEQ-Unmix on the GPU: not measured (HYPERDEQ_BENCH_UNMIX_FIT names no saved fit)."
        )
        return
    from safetensors.torch import load_file

    from workers.unmix.deq_unmix import DEQUnmix

    t = load_file(str(Path(d) / "unmix_fit.safetensors"))
    cfg = json.loads((Path(d) / "unmix_fit.json").read_text())["config"]
    E = t["endmembers"].float()
    m = DEQUnmix(
        E.clone(),
        hidden=int(cfg["hidden"]),
        tol=float(cfg["tol"]),
        max_iter=int(cfg["max_iter"]),
        eval_max_iter=int(cfg["eval_max_iter"]),
        backward_max_iter=int(cfg["max_iter"]),
    )
    m.net.load_state_dict({k.removeprefix("net."): v for k, v in t.items() if k.startswith("net.")})
    m = m.eval().to(dev)
    b = E.shape[0]
    rows: list[dict[str, Any]] = []
    for side in (32, 128, 512, 1024):
        reps = (1, -(-side // cube.shape[1]), -(-side // cube.shape[2]))
        x = np.tile(np.nan_to_num(cube[:b]), reps)[:, :side, :side]
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(dev)
        with torch.no_grad():
            m(xt[..., :8, :8])
            _sync(dev)
            ts = time.perf_counter()
            _A, ust = m(xt)
            _sync(dev)
            s = time.perf_counter() - ts
        rows.append(
            {
                "model": "DEQ-Unmix (module)",
                "tile": f"{side}×{side}",
                "bands": b,
                "P": int(E.shape[1]),
                "seconds": s,
                "mvox_s": mvox_per_s(side * side, b, s),
                "iterations (max)": int(ust.iterations.max()),
                "converged": bool(ust.converged.all()),
            }
        )
    sec.tables["GPU: DEQ-Unmix throughput (fit from the CPU machine)"] = rows
    sec.values["gpu_unmix_mvox_s"] = max(r["mvox_s"] for r in rows)


def _train_memory(sec: Section, cube: np.ndarray, dev: str = "cuda") -> None:
    import torch

    from benchmarks.deq_memory import training_step
    from workers.denoise.decsc import DECSC, DECSCConfig, estimate_sigma

    torch.manual_seed(0)
    size = 64
    model = DECSC(DECSCConfig()).to(dev)
    fmap = model.map
    bands = model.cfg.bands
    reps = (1, -(-size // cube.shape[1]), -(-size // cube.shape[2]))
    clean = np.tile(np.nan_to_num(cube[:bands]), reps)[:, :size, :size].clip(0, 1)
    rng = np.random.default_rng(0)
    y = (
        torch.from_numpy((clean + rng.normal(0, 30 / 255, clean.shape)).astype(np.float32))[None]
        .repeat(4, 1, 1, 1)
        .to(dev)
    )
    sig = estimate_sigma(y)
    x = torch.cat([y, sig[:, :, None, None].expand_as(y)], 1)

    rows: list[dict[str, Any]] = []
    for n in (10, 20, 40):
        for mode in ("implicit", "unrolled"):
            fmap.zero_grad(set_to_none=True)
            _sync(dev)
            if dev == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if dev == "cuda" else 0
            ts = time.perf_counter()
            training_step(fmap, x, size, mode, n)
            _sync(dev)
            rows.append(
                {
                    "backward": mode,
                    "solver iterations": n,
                    "batch": 4,
                    "tile": f"{size}×{size}×{bands}",
                    "peak MiB above start": (torch.cuda.max_memory_allocated() - base) / 2**20
                    if dev == "cuda"
                    else None,
                    "seconds": time.perf_counter() - ts,
                }
            )
    sec.tables["GPU: DEQ training memory, implicit vs unrolled (DECSC map)"] = rows
