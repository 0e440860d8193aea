"""Issue 22's GPU measurements in one run: DECSC with the default settings on a 1024 x 1024 x 224 scene.

Run on the GPU machine by ``bash benchmarks/gpu_session/run_issue22_gpu.sh`` (results under $OUT)::

    python -m benchmarks.gpu_session.issue22_gpu --out DIR [--size 1024] [--device cuda] [--time-limit-s 420]

1. **Scene.** A ``size`` x ``size`` x 224 GeoTIFF mirrored from the fully valid 64 x 128 window of the
   shipped EnMAP demo mosaic (rows 96:160, columns 32:160; blocks flipped on odd rows/columns so the
   edges stay continuous), with the mosaic's georeferencing and band tags. A fully valid base, since
   the mosaic itself is 40 % nodata and the pipeline skips tiles without a valid pixel.
2. **Model alone.** What the pipeline's denoise stage runs on each tile
   (``DenoiseOptions().tile_model(device)``: shipped weights, band guard, subspace pass k = 8), on the
   tiles the pipeline plans for this scene (``workers.run.preflight``: tile size and halo), one after
   the other in this process, the cube in memory; one warm-up tile first, then
   ``torch.cuda.synchronize()`` around the timed loop. MVox/s = scene pixels x 224 bands / seconds.
   When the time share runs out the loop stops and the rate is taken from the tiles done.
3. **GPU busy fraction** through that loop: ``torch.cuda.utilization()`` (NVML through pynvml) every
   0.2 s, or ``nvidia-smi --query-gpu=utilization.gpu`` polled by a thread; the method is recorded.
4. **Whole CLI.** ``hyperdeq run SCENE --device DEVICE --no-unmix`` in a fresh process (new output
   folder); its wall time against the model-alone time for the whole scene, and its run.json (stage
   wall times, per-tile ``precision`` and device), copied to ``DIR/run.json``.

Writes ``DIR/issue22_gpu.json`` and ``DIR/issue22_gpu.md`` (target, measured, goal, met), rewritten
after each step, so a run stopped from outside still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data import VALID_WINDOWS, demo_path
from benchmarks.harness import fmt

ROOT = Path(__file__).resolve().parents[2]
GOAL_MVOX = 50.0
GOAL_RATIO = 1.3
GOAL_BUSY = 0.8
SAMPLE_S = 0.2
#: share of the time limit the model-alone loop may use (its rate settles within a few tiles; the
#: CLI run, which must do the whole scene, gets the rest)
MODEL_SHARE = 0.3


# ---------------------------------------------------------------------------- the scene
def build_scene(dest: Path, size: int) -> Path:
    """A ``size`` x ``size`` GeoTIFF of all the demo's bands, mirrored from its fully valid 64 x 128 window."""
    import rasterio
    from rasterio.windows import Window

    from benchmarks.data import _profile_and_tags

    y0, x0, h, w = VALID_WINDOWS[1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(demo_path()) as src:
        nb = src.count
        base_win = Window(x0, y0, w, h)
        block = src.read(window=base_win)
        transform = src.window_transform(base_win)
    prof, tags, band_tags, desc = _profile_and_tags(nb)
    prof.update(
        count=nb,
        height=size,
        width=size,
        transform=transform,
        tiled=True,
        blockxsize=32 if size >= 32 else 16,
        blockysize=32 if size >= 32 else 16,
        compress=None,
        interleave="pixel",
        BIGTIFF="IF_SAFER",
    )
    ky, kx = -(-size // h), -(-size // w)
    with rasterio.open(dest, "w", **prof) as dst:
        for i in range(ky):  # one strip of blocks at a time: never the whole scene in memory
            row = [block[:, ::-1, :] if i % 2 else block for _ in range(kx)]
            strip = np.concatenate([b[:, :, ::-1] if j % 2 else b for j, b in enumerate(row)], 2)
            rows = min(h, size - i * h)
            dst.write(
                np.ascontiguousarray(strip[:, :rows, :size]), window=Window(0, i * h, size, rows)
            )
        dst.update_tags(
            **tags, HYPERDEQ_BENCH=f"{size}x{size} mirrored from demo[{y0}:{y0 + h}, {x0}:{x0 + w}]"
        )
        for b in range(nb):
            dst.update_tags(b + 1, **band_tags[b])
            if desc[b]:
                dst.set_band_description(b + 1, desc[b])
    return dest


# ---------------------------------------------------------------------------- GPU busy sampler
class BusySampler:
    """GPU utilisation (0-100) every ``SAMPLE_S`` seconds on a thread: pynvml, else nvidia-smi."""

    def __init__(self, device: str) -> None:
        self.samples: list[tuple[float, float]] = []
        self.method: str | None = None
        self.why_not = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not device.startswith("cuda"):
            self.why_not = f"device {device!r}: no GPU to sample"
            return
        try:
            import torch

            torch.cuda.utilization(0)
            self.method = "torch.cuda.utilization() (NVML via pynvml)"
        except Exception as exc:  # noqa: BLE001 - pynvml missing: fall back to nvidia-smi
            self.why_not = f"torch.cuda.utilization(): {type(exc).__name__}: {exc}"
            if shutil.which("nvidia-smi"):
                self.method = "nvidia-smi --query-gpu=utilization.gpu (polled)"

    def _read(self) -> float | None:
        if self.method is None:
            return None
        if self.method.startswith("torch"):
            import torch

            return float(torch.cuda.utilization(0))
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
        return float(out.split()[0]) if out.split() else None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                v = self._read()
            except Exception:  # noqa: BLE001 - one failed poll is one missing sample
                v = None
            if v is not None:
                self.samples.append((time.perf_counter(), v))
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> BusySampler:
        if self.method is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def fraction(self, t0: float = -math.inf, t1: float = math.inf) -> float | None:
        vals = [v for t, v in self.samples if t0 <= t <= t1]
        return float(np.mean(vals)) / 100 if vals else None

    def active_fraction(self) -> float | None:
        """Mean from the first to the last non-zero sample (the span where the GPU worked)."""
        busy = [t for t, v in self.samples if v > 0]
        return self.fraction(busy[0], busy[-1]) if busy else None

    def final_fraction(self, seconds: float | None) -> float | None:
        """Mean over the ``seconds`` that end at the last non-zero sample: a stage of that length
        whose end is the GPU's last work (the CLI's denoise stage: blending and writing are CPU work)."""
        busy = [t for t, v in self.samples if v > 0]
        return self.fraction(busy[-1] - seconds, busy[-1]) if busy and seconds else None


# ---------------------------------------------------------------------------- model alone
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def plan_tiles(scene: Path, device: str, work: Path) -> tuple[Any, Any]:
    """The job the CLI would run (defaults, ``--no-unmix``) resolved for ``scene``, and its tile grid."""
    from pipeline.config import RunConfig
    from pipeline.grid import plan_grid
    from workers.plan import Job
    from workers.run import preflight

    pre = preflight(scene, Job(RunConfig(device=device, out_root=work / "plan"), unmix=None))
    cfg = pre.job.config
    return pre.job, plan_grid(
        (pre.info["rows"], pre.info["cols"]), int(cfg.tile or 0), int(cfg.halo or 0)
    )


def time_model(scene: Path, device: str, work: Path, deadline: float) -> dict[str, Any]:
    """DECSC as the pipeline runs it, tile by tile over the pipeline's grid, stopping at ``deadline``."""
    from pipeline.readers import open_scene
    from pipeline.scene import good_band_index

    job, grid = plan_tiles(scene, device, work)
    da = open_scene(scene)
    n_bands, n_rows, n_cols = (int(v) for v in da.shape)
    cube = np.ascontiguousarray(np.asarray(da.values[good_band_index(da)], dtype=np.float32))
    tm = job.options("denoise").tile_model(device)
    t = time.perf_counter()
    tm.module()
    load_s = time.perf_counter() - t
    tiles = list(grid.tiles)
    t = time.perf_counter()
    tm(cube[(slice(None), *tiles[0].read.slices)])  # warm-up (kernels, cuDNN autotune, allocator)
    _sync(device)
    warm_s = time.perf_counter() - t
    done, core_px, read_px, precision = 0, 0, 0, Counter[str]()
    sampler = BusySampler(device)
    with sampler:
        _sync(device)
        t0 = time.perf_counter()
        for tile in tiles:
            _out, stats = tm(cube[(slice(None), *tile.read.slices)])
            precision[str(stats.get("precision", "?"))] += 1
            done += 1
            core_px += tile.core.height * tile.core.width
            read_px += tile.read.height * tile.read.width
            if time.perf_counter() > deadline:
                break
        _sync(device)
        t1 = time.perf_counter()
    secs = t1 - t0
    mvox = core_px * n_bands / 1e6 / secs
    return {
        "scene_shape": [n_bands, n_rows, n_cols],
        "good_bands": int(cube.shape[0]),
        "tile": int(job.config.tile),
        "halo": int(job.config.halo or 0),
        "options": {"arch": tm.arch, "guard": tm.guard, "subspace": tm.subspace},
        "load_s": load_s,
        "warmup_tile_s": warm_s,
        "tiles_timed": done,
        "tiles_total": len(tiles),
        "complete": done == len(tiles),
        "seconds": secs,
        "read_over_core": read_px / core_px,
        "mvox_s": mvox,
        "mvox_s_good_bands": core_px * cube.shape[0] / 1e6 / secs,
        "scene_s_at_rate": n_rows * n_cols * n_bands / 1e6 / mvox,
        "precision": dict(precision),
        "busy_fraction": sampler.fraction(t0, t1),
        "busy_samples": len([s for s in sampler.samples if t0 <= s[0] <= t1]),
        "busy_method": sampler.method,
        "busy_why_not": sampler.why_not,
    }


# ---------------------------------------------------------------------------- the whole CLI
def _cli_command(scene: Path, device: str, out_root: Path) -> list[str]:
    exe = Path(sys.executable).with_name("hyperdeq")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    return [*head, "run", str(scene), "--device", device, "--no-unmix", "--out", str(out_root)]


def _run_record(out_root: Path) -> tuple[Path | None, dict[str, Any]]:
    found = sorted(out_root.glob("*/*/run.json"))
    if not found:
        return None, {}
    return found[0], json.loads(found[0].read_text())


def _summarise_record(rec: dict[str, Any]) -> dict[str, Any]:
    stages = rec.get("stages") or {}
    tiles = (rec.get("tiles") or {}).get("denoise") or []
    return {
        "status": rec.get("status"),
        "code_version": rec.get("code_version"),
        "config": (rec.get("config") or {}).get("config"),
        "cluster": rec.get("cluster"),
        "stages_s": {k: v.get("wall_s") for k, v in stages.items() if isinstance(v, dict)},
        "denoise_tiles": len(tiles),
        "tile_precision": dict(Counter(str(t.get("precision")) for t in tiles)),
        "tile_device": dict(Counter(str(t.get("device")) for t in tiles)),
        "tile_wall_s_sum": sum(float(t.get("wall_s") or 0) for t in tiles),
    }


def time_cli(scene: Path, device: str, work: Path, out: Path, timeout_s: float) -> dict[str, Any]:
    """``hyperdeq run SCENE --device DEVICE --no-unmix`` in a fresh process; SIGTERM at ``timeout_s``."""
    out_root = work / "cli"
    cmd = _cli_command(scene, device, out_root)
    log = work / "cli_run.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    sampler = BusySampler(device)
    timed_out = False
    with sampler, log.open("w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGTERM)  # the run ends its record "cancelled"
            try:
                rc = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        wall = time.perf_counter() - t0
    path, rec = _run_record(out_root)
    summary = _summarise_record(rec)
    if path is not None:
        shutil.copy(path, out / "run.json")
    tail = log.read_text(errors="replace").splitlines()[-40:]
    (out / "cli_run.log").write_text("\n".join(tail) + "\n")
    return {
        "command": " ".join(["hyperdeq", *cmd[cmd.index("run") :]]),
        "returncode": rc,
        "timed_out": timed_out,
        "timeout_s": timeout_s,
        "wall_s": wall,
        "run_json": str(path) if path else None,
        **summary,
        "busy_fraction_denoise_stage": sampler.final_fraction(
            (summary["stages_s"] or {}).get("denoise")
        ),
        "busy_fraction_whole_run": sampler.fraction(),
        "busy_fraction_gpu_active_span": sampler.active_fraction(),
        "busy_method": sampler.method,
        "log_tail": tail[-5:] if rc != 0 else [],
    }


# ---------------------------------------------------------------------------- report
def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The three goals of issue 22's GPU part, each measured (None where not measured) and met or not."""
    m, c = res.get("model") or {}, res.get("cli") or {}
    size = res["size"]
    mvox = m.get("mvox_s")
    part = (
        "" if m.get("complete", True) else f" ({m.get('tiles_timed')}/{m.get('tiles_total')} tiles)"
    )
    ratio: float | str | None = None
    ratio_met: bool | None = None
    if mvox and c.get("returncode") == 0 and not c.get("timed_out"):
        full = float(c["wall_s"] / m["scene_s_at_rate"])
        ratio, ratio_met = full, full <= GOAL_RATIO
    elif mvox and c.get("timed_out"):  # stopped at the time limit: a lower bound
        low = c["wall_s"] / m["scene_s_at_rate"]
        ratio, ratio_met = (
            f"> {low:.3g} (stopped at the time limit)",
            (False if low > GOAL_RATIO else None),
        )
    busy, cbusy = m.get("busy_fraction"), c.get("busy_fraction_denoise_stage")
    why = m.get("busy_why_not")
    return [
        {
            "target": f"DECSC model alone, default settings, {size}x{size}x224: MVox/s{part}",
            "measured": mvox,
            "goal": f">= {GOAL_MVOX:g}",
            "met": None if mvox is None else mvox >= GOAL_MVOX,
        },
        {
            "target": "`hyperdeq run --no-unmix` wall / model-alone time (whole scene)",
            "measured": ratio,
            "goal": f"<= {GOAL_RATIO:g}",
            "met": ratio_met,
        },
        {
            "target": "GPU busy fraction through the model stage: model alone "
            f"({m.get('busy_method') if busy is not None else why})",
            "measured": busy,
            "goal": f">= {GOAL_BUSY:g}",
            "met": None if busy is None else busy >= GOAL_BUSY,
        },
        {
            "target": "GPU busy fraction through the model stage: the CLI run's denoise stage "
            "(its wall_s ending at the last non-zero sample)",
            "measured": cbusy,
            "goal": f">= {GOAL_BUSY:g}",
            "met": None if cbusy is None else cbusy >= GOAL_BUSY,
        },
    ]


def _detail_lines(res: dict[str, Any]) -> list[str]:
    m, c = res.get("model") or {}, res.get("cli") or {}
    lines = [
        f"- scene: {res.get('scene_note')}",
        f"- steps not done: {res.get('skipped') or 'none'}",
    ]
    if m:
        lines += [
            f"- model alone: {m['tiles_timed']}/{m['tiles_total']} tiles of {m['tile']} px + halo "
            f"{m['halo']} ({m['good_bands']} good bands of {m['scene_shape'][0]}; reads "
            f"{m['read_over_core']:.2f}x the core pixels), {fmt(m['seconds'])} s timed after a "
            f"{fmt(m['warmup_tile_s'])} s warm-up tile (weights load {fmt(m['load_s'])} s); "
            f"{fmt(m['mvox_s_good_bands'])} MVox/s counting good bands only; whole scene at this "
            f"rate {fmt(m['scene_s_at_rate'])} s; options {m['options']}; tile precision "
            f"{m['precision']}; busy samples {m['busy_samples']}",
        ]
    if c:
        lines += [
            f"- CLI: `{c['command']}` exit {c['returncode']}{' (timed out)' if c['timed_out'] else ''},"
            f" wall {fmt(c['wall_s'])} s, status {c.get('status')}, stages (s) "
            f"{ {k: round(v, 2) for k, v in (c.get('stages_s') or {}).items() if v is not None} }",
            f"- CLI tiles: {c.get('denoise_tiles')} denoise tiles, precision {c.get('tile_precision')}, "
            f"device {c.get('tile_device')}, tile wall sum {fmt(c.get('tile_wall_s_sum'))} s; "
            f"GPU busy whole run {fmt(c.get('busy_fraction_whole_run'))}, over the GPU-active span "
            f"{fmt(c.get('busy_fraction_gpu_active_span'))} ({c.get('busy_method')})",
        ]
        lines += [f"  - log: {ln}" for ln in c.get("log_tail") or []]
    return lines


def write_report(res: dict[str, Any], out: Path) -> None:
    res["targets"] = targets(res)
    (out / "issue22_gpu.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    lines = [
        f"# Issue 22, GPU: DECSC default settings on a {res['size']} x {res['size']} x 224 scene",
        "",
        f"device **{res['device_name']}** ({res['device']}) · torch {res['torch']} · commit "
        f"{res['commit']} · {res['started']} · {fmt(res.get('elapsed_s'))} s of a "
        f"{res['time_limit_s']:g} s limit",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for t in res["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "MISSED")
        lines.append(f"| {t['target']} | {fmt(t['measured'])} | {t['goal']} | {met} |")
    lines += ["", *_detail_lines(res), ""]
    (out / "issue22_gpu.md").write_text("\n".join(lines))


def _environment(device: str) -> dict[str, Any]:
    import platform

    import torch

    name = platform.processor() or platform.machine()
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    commit = git.stdout.strip() if git.returncode == 0 else "unknown (no git here)"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if git.returncode == 0 and dirty.stdout.strip():
        commit += " (+ uncommitted changes)"
    return {
        "device_name": name,
        "torch": torch.__version__,
        "commit": commit,
        "cuda": torch.version.cuda,
    }


def run(out: Path, size: int, device: str, time_limit_s: float, work: Path) -> dict[str, Any]:
    """Every step in order, the report rewritten after each; steps that no longer fit are skipped."""
    t_start = time.perf_counter()
    deadline = t_start + time_limit_s
    res: dict[str, Any] = {
        "size": size,
        "device": device,
        "time_limit_s": time_limit_s,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **_environment(device),
        "skipped": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    scene = build_scene(work / f"mirrored_{size}.tif", size)
    res["scene"] = str(scene)
    res["scene_note"] = (
        f"{size}x{size}x224 GeoTIFF mirrored from the fully valid demo window {VALID_WINDOWS[1]} "
        f"(y0, x0, h, w), built in {time.perf_counter() - t:.1f} s"
    )
    write_report(res, out)
    model_deadline = t_start + MODEL_SHARE * time_limit_s
    res["model"] = time_model(scene, device, work, model_deadline)
    res["elapsed_s"] = time.perf_counter() - t_start
    write_report(res, out)
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()  # the CLI's worker gets the whole GPU
    left = deadline - time.perf_counter() - 15
    if left < 30:
        res["skipped"].append(f"CLI run: {left:.0f} s left of the time limit")
    else:
        res["cli"] = time_cli(scene, device, work, out, left)
    res["elapsed_s"] = time.perf_counter() - t_start
    write_report(res, out)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, required=True, help="folder for issue22_gpu.json/.md, run.json"
    )
    ap.add_argument("--size", type=int, default=1024, help="scene side in pixels (default 1024)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--time-limit-s", type=float, default=420.0, help="stop steps after this")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    a = ap.parse_args(argv)
    if a.size < 32:
        ap.error(f"--size must be at least 32, got {a.size}")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda but torch sees no CUDA device; use --device cpu for a dry run")
    work = a.work or Path(tempfile.mkdtemp(prefix="issue22_"))
    work.mkdir(parents=True, exist_ok=True)
    res = run(a.out, a.size, a.device, a.time_limit_s, work)
    print((a.out / "issue22_gpu.md").read_text())
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if res.get("model") else 1


if __name__ == "__main__":
    raise SystemExit(main())
