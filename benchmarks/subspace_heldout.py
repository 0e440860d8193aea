"""DECSC with and without its spectral-subspace pass on real scenes other than the test scenes.

The pass's settings (k = 8, cleaning thresholds, final projection) were chosen on the two test
scenes (Jasper Ridge, Pavia Centre ``abu-beach-4``); this checks them on four other real cubes of
``../shared/data`` (they are among the model's training scenes, so this is a check of the pass,
not of the model): the protocol's noise (``pipeline.noise``, seed 0), MPSNR of the output clamped
to [0, 1], bands worse than the noisy input, time.

    python -m benchmarks.subspace_heldout [--data ../shared/data] [--cases 'gauss30;band[0,95];mixture']

Writes ``benchmarks/results/denoise_subspace_heldout.json`` and prints one JSON line per cube.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "denoise_subspace_heldout.json"


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    return (a - a.min()) / (a.max() - a.min())


def scenes(data: Path) -> dict[str, np.ndarray]:
    """(B, H, W) cubes in [0, 1]: min-max scaled over each whole crop."""
    import scipy.io as sio

    out = {
        "pavia_u 50x50x103": _minmax(
            sio.loadmat(data / "pavia_u_sub/paviaU_subimg.mat")["paviaU_subimg"]
        ),
        "cuprite 50x90x188": _minmax(
            sio.loadmat(data / "cuprite/Rcuprite50x90x188.mat")["Rcuprite50x90x188"]
        ),
        "hydice_urban 100x80x162": _minmax(
            sio.loadmat(data / "anomaly_abu/HYDICE_data.mat")["data"]
        ),
    }
    with np.load(data / "cave/balloons_ms_256.npz") as d:
        c = d["cube"].astype(np.float32)
        out["cave_balloons 128x128x31"] = (c / c.max())[64:192, 64:192]
    return {k: np.ascontiguousarray(v.transpose(2, 0, 1), dtype=np.float32) for k, v in out.items()}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("HYPERDEQ_SHARED_DATA", ROOT.parent / "shared" / "data")),
    )
    ap.add_argument(
        "--cases", default="gauss30;gauss50;band[0,95];mixture", help="noise cases, ';'-separated"
    )
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=OUT)
    args = ap.parse_args(argv)

    import torch

    from pipeline.metrics import band_psnr
    from pipeline.noise import add_noise
    from pipeline.provenance import code_version, cpu_model
    from workers.denoise.api import denoise_cube, load_denoiser

    torch.set_num_threads(args.threads)
    model = load_denoiser()
    rows: list[dict[str, Any]] = []
    for name, clean in scenes(args.data).items():
        for case in args.cases.split(";"):
            y = add_noise(clean, case, np.random.default_rng(0)).astype(np.float32)
            nb = band_psnr(clean, np.clip(y, 0, 1))
            row: dict[str, Any] = {"scene": name, "case": case, "noisy": round(float(nb.mean()), 2)}
            for label, k in (("alone", 0), ("subspace", args.k)):
                t0 = time.perf_counter()
                out, st = denoise_cube(model, y, subspace=k or 0)
                bp = band_psnr(clean, np.clip(out, 0, 1))
                row[label] = {
                    "mpsnr_db": round(float(bp.mean()), 2),
                    "bands_worse": int((bp < nb).sum()),
                    "time_s": round(time.perf_counter() - t0, 1),
                }
                if k and "subspace_blend" in st:
                    row[label]["blend"] = st["subspace_blend"]
                if k and "subspace_stuck" in st:
                    row[label]["stuck_pixels"] = st["subspace_stuck"]
            row["gain_db"] = round(row["subspace"]["mpsnr_db"] - row["alone"]["mpsnr_db"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "rows": rows,
                "k": args.k,
                "guard": True,
                "seed": 0,
                "code_version": code_version(),
                "device": f"CPU ({cpu_model()}), {args.threads} torch threads",
                "python": platform.python_version(),
                "command": "python -m benchmarks.subspace_heldout "
                + " ".join(argv if argv is not None else []),
            },
            indent=1,
        )
    )
    return rows


if __name__ == "__main__":
    main()
