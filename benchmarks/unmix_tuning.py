"""DEQ-Unmix's fit hyperparameters chosen on the tuning scenes only (issue 25's protocol).

``python -m benchmarks.unmix_tuning`` fits every combination of the class fraction of the
endmember start (``init_class_fraction``), the endmember step (``lr_endmembers``), the network
step (``lr_net``) and the mixing model's margin (``mixing_margin``) on the tuning
scenes (Samson and the USGS variability sets by default, seeds 0, 1, 2) and ranks them by the
geometric mean over scenes and seeds of DEQ aRMSE / VCA+FCLS aRMSE. The reported scenes
(:data:`workers.unmix.evaluate.REPORTED_SCENES`) are refused: nothing is chosen on them. Prints a
markdown table and writes ``benchmarks/results/unmix_tuning.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def score(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Geometric mean of DEQ / VCA+FCLS aRMSE over ``results``, and Samson's mean SAD."""
    ratios = [r["deq-unmix"]["abundance_rmse"] / r["vca+fcls"]["abundance_rmse"] for r in results]
    samson = [r["deq-unmix"]["sad_mean_deg"] for r in results if r["scene"] == "samson"]
    return {
        "geo_mean_vs_vca": float(np.exp(np.mean(np.log(ratios)))),
        "worst_vs_vca": float(max(ratios)),
        "samson_sad_mean_deg": float(np.mean(samson)) if samson else None,
        "min_converged_share": float(
            min(
                r["deq-unmix"]["solver"]["converged_pixels"]
                / r["deq-unmix"]["solver"]["valid_pixels"]
                for r in results
            )
        ),
        "cases": len(results),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from pipeline.scene import MissingCRSWarning
    from workers.unmix.evaluate import REPORTED_SCENES, load_cases, run_case

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--scenes", default="samson,synthetic_var")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--class-fractions", default="0.15,0.25,0.35")
    ap.add_argument("--lr-endmembers", default="2.5e-4,5e-4,1e-3")
    ap.add_argument("--lr-net", default="2e-3")
    ap.add_argument("--mixing-margins", default="0.05")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "unmix_tuning.json"
    )
    a = ap.parse_args(argv)
    scenes = [s.strip() for s in a.scenes.split(",") if s.strip()]
    reported = sorted(set(scenes) & set(REPORTED_SCENES))
    if reported:
        raise SystemExit(f"{reported!r} are reported scenes: nothing may be tuned on them")
    warnings.simplefilter("ignore", MissingCRSWarning)
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    grid = list(
        itertools.product(
            [float(x) for x in a.class_fractions.split(",")],
            [float(x) for x in a.lr_endmembers.split(",")],
            [float(x) for x in a.lr_net.split(",")],
            [float(x) for x in a.mixing_margins.split(",")],
        )
    )
    rows = []
    for frac, lr, lr_net, margin in grid:
        t0 = time.perf_counter()
        opts = {
            "init_class_fraction": frac,
            "lr_endmembers": lr,
            "lr_net": lr_net,
            "mixing_margin": margin,
        }
        res = [
            run_case(case, seed=sd, options=opts, methods=("deq-unmix", "vca+fcls"))
            for sd in seeds
            for name in scenes
            for case in load_cases(a.data, [name], seed=sd)
        ]
        row = {
            "options": opts,
            **score(res),
            "per_case": {
                f"{r['scene']} seed {r['seed']}": r["deq-unmix"]["abundance_rmse"]
                / r["vca+fcls"]["abundance_rmse"]
                for r in res
            },
            "wall_s": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            f"class fraction {frac:g}, lr_endmembers {lr:g}, lr_net {lr_net:g}, margin {margin:g}: "
            f"geo-mean DEQ/VCA+FCLS {row['geo_mean_vs_vca']:.3f}, worst {row['worst_vs_vca']:.3f}, "
            f"least converged {row['min_converged_share']:.3f}, Samson SAD "
            f"{row['samson_sad_mean_deg']}, {row['wall_s']:.0f} s",
            flush=True,
        )
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(
            json.dumps(
                {
                    "command": "python -m benchmarks.unmix_tuning",
                    "scenes": scenes,
                    "seeds": seeds,
                    "rows": rows,
                },
                indent=1,
            )
        )
    print(
        "\n| class fraction | lr_endmembers | lr_net | mixing margin | geo-mean DEQ / VCA+FCLS | "
        "worst | least converged | Samson SAD (°) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["geo_mean_vs_vca"]):
        o = r["options"]
        sad = r["samson_sad_mean_deg"]
        print(
            f"| {o['init_class_fraction']:g} | {o['lr_endmembers']:g} | {o['lr_net']:g} | "
            f"{o['mixing_margin']:g} | {r['geo_mean_vs_vca']:.3f} "
            f"| {r['worst_vs_vca']:.3f} | {r['min_converged_share']:.3f} | {'' if sad is None else f'{sad:.2f}'} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
