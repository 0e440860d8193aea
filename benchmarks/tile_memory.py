"""Per-tile memory of DECSC: measured peak RSS against the pipeline's estimate.

Each configuration runs in a fresh Python process: the shipped (or full-size) DECSC is loaded, a
real tile is read from the EnMAP Potsdam demo mosaic (good bands, NaN nodata kept, the pipeline's
reflectance scale), the process's peak-RSS mark is reset (``/proc/self/clear_refs``), then
``denoise_cube`` runs the tile as a worker would. Reported: the peak RSS above the level before
the call (what the tile's denoising added), next to the parts of
``RunConfig.tile_memory_parts`` (with ``DenoiseOptions.memory_parts``) that it should stay under (``decsc`` + ``subspace``; the ``io``
part, 12× the input, covers the tile's input, outputs and blending buffers in the tile engine).

Run: ``python -m benchmarks.tile_memory [--sizes 96,160] [--arch shipped] [--threads 2]`` (Linux).
Writes ``benchmarks/results/tile_memory.json`` and ``docs/benchmarks/tile_memory.md`` (``_full`` in
both names for ``--arch full``).
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
MOSAIC = ROOT / "tests" / "data" / "demo" / "enmap_potsdam_mosaic_18tiles.tif"
OUT_JSON = ROOT / "benchmarks" / "results" / "tile_memory{}.json"
OUT_MD = ROOT / "docs" / "benchmarks" / "tile_memory{}.md"

_CHILD = r"""
import json, re, sys, time
import numpy as np, torch
size, arch, subspace, threads = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
from pipeline.readers import open_scene
from pipeline.scene import good_band_index
from workers.denoise.api import denoise_cube, load_denoiser

def rss(key):
    txt = open("/proc/self/status").read()
    return int(re.search(key + r":\s+(\d+) kB", txt).group(1)) * 1024

model = load_denoiser(arch=arch)
scene = open_scene(sys.argv[5]).isel(y=slice(0, size), x=slice(0, size)).load()
good = good_band_index(scene)
cube = np.asarray(scene.values[good], dtype=np.float32)
if cube.shape[1:] != (size, size):
    raise SystemExit(f"the mosaic is smaller than {size} px")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM)
before = rss("VmRSS")
t0 = time.perf_counter()
out, st = denoise_cube(model, cube, subspace=subspace or 0)
wall = time.perf_counter() - t0
peak = rss("VmHWM")
print(json.dumps({"bands": int(cube.shape[0]), "added_bytes": peak - before, "input_bytes": int(cube.nbytes),
                  "wall_s": round(wall, 1), "valid_px": int(np.isfinite(cube).all(axis=0).sum())}))
"""


def measure(size: int, arch: str, subspace: int, threads: int) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, str(size), arch, str(subspace), str(threads), str(MOSAIC)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(
            f"tile {size} px, {arch}, subspace {subspace} failed:\n{res.stderr[-2000:]}"
        )
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes", default="96,160", help="tile sides in pixels (core + halo), comma-separated"
    )
    ap.add_argument("--arch", default="shipped", choices=("shipped", "full"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from pipeline.config import RunConfig
    from pipeline.provenance import code_version, cpu_model
    from workers.denoise.options import DenoiseOptions

    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for subspace in (8, 0):
            m = measure(size, args.arch, subspace, args.threads)
            cfg = RunConfig(tile=size, halo=0, tile_memory_mb=1e9)
            model = DenoiseOptions(arch=args.arch, subspace=subspace).memory_parts(
                size, size, m["bands"], cfg.device
            )
            parts = cfg.tile_memory_parts(m["bands"], model)
            est = parts["decsc"] + parts["subspace"]
            row = {
                "tile_px": size,
                "arch": args.arch,
                "subspace": subspace,
                **m,
                "estimate_decsc_subspace_bytes": est,
                "estimate_total_bytes": sum(parts.values()),
                "measured_over_estimate": round(m["added_bytes"] / est, 3),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {
        "code_version": code_version(),
        "device": f"CPU ({cpu_model()}), {args.threads} torch threads",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benchmarks.tile_memory "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    suffix = "" if args.arch == "shipped" else f"_{args.arch}"
    out_json, out_md = Path(str(OUT_JSON).format(suffix)), Path(str(OUT_MD).format(suffix))
    out_json.write_text(json.dumps({"rows": rows, **meta}, indent=1))
    lines = [
        "# DECSC per-tile memory: measured vs the pipeline's estimate",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; code {meta['code_version']}",
        f"- device: {meta['device']}; input: `tests/data/demo/enmap_potsdam_mosaic_18tiles.tif` (top-left tile)",
        "",
        "| tile (px) | bands | model | subspace k | input (MiB) | measured peak added (MiB) | estimate decsc + subspace (MiB) | measured / estimate | estimate with io (MiB) | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for r in rows:
        lines.append(
            f"| {r['tile_px']} | {r['bands']} | {r['arch']} | {r['subspace']} | {r['input_bytes'] / mib:.0f} | "
            f"{r['added_bytes'] / mib:.0f} | {r['estimate_decsc_subspace_bytes'] / mib:.0f} | "
            f"{r['measured_over_estimate']:.2f} | {r['estimate_total_bytes'] / mib:.0f} | {r['wall_s']} |"
        )
    out_md.write_text("\n".join(lines) + "\n")
    print(f"wrote {out_md.relative_to(ROOT)} and {out_json.relative_to(ROOT)}")
    return rows


if __name__ == "__main__":
    main()
