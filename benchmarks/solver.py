"""DEQ solver per tile: iterations and residuals, cold start vs warm start.

DECSC on one spectral window (its trained ``bands``) of the real demo crop, tiled with the
pipeline's own grid (overlapping read windows). For every tile, three starts of the same solver
(Anderson, same tolerance, same cap):

* ``cold``: zeros (what the pipeline does today);
* ``warm: neighbour``: the fixed point of the previous tile in raster order (left, else above),
  copied into the pixels the two read windows share; zeros elsewhere;
* ``warm: coarse``: the fixed point of the tile downsampled 2× (cold solve, ¼ of the pixels),
  codes upsampled to full resolution.

The iteration counts are the solver's own statistics (:class:`workers.deq.SolverStats`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks.data import read_cube
from benchmarks.harness import Section, Target
from benchmarks.models import denoiser
from benchmarks.plan import SizePlan


def _pad8(n: int, ws: int) -> int:
    return n + (-n) % ws


def run(sec: Section, plan: SizePlan, device: str) -> None:
    import torch
    import torch.nn.functional as F

    from pipeline.grid import plan_grid
    from workers.denoise.decsc import estimate_sigma

    model, wlabel = denoiser(device)
    B = model.cfg.bands
    C, ws = model.cfg.unshared_features, model.cfg.window
    cube, _ = read_cube(plan.solver_crop)
    if cube.shape[0] < B:
        idx = np.arange(B) % cube.shape[0]
        cube = cube[idx]
    cube = cube[:B]
    halo = max(4, plan.solver_tile // 4)
    grid = plan_grid(cube.shape[1:], plan.solver_tile, halo)
    tiles = sorted(grid.tiles)
    tol = model.deq.cfg.tol
    cap = plan.solver_max_iter
    y_all = torch.from_numpy(cube).to(device)
    sigma = estimate_sigma(
        y_all[None]
    )  # one noise estimate for the scene, as denoise_cube does per cube

    def codes(z: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        return model.map.unpack(z, h, w)

    def pack(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.cat([a.flatten(1), u.flatten(1)], dim=1)

    fixed: dict[Any, tuple[Any, torch.Tensor, torch.Tensor]] = {}
    rows: list[dict[str, Any]] = []
    agg: dict[str, list[tuple[int, float, bool, float]]] = {
        "cold": [],
        "warm: neighbour": [],
        "warm: coarse": [],
    }
    with torch.no_grad():
        for t in tiles:
            r = t.read
            y = y_all[:, r.y0 : r.y1, r.x0 : r.x1][None]
            h, w = y.shape[-2:]
            hp, wp = _pad8(h, ws), _pad8(w, ws)
            # cold
            t0 = time.perf_counter()
            _, st = model(y, sigma, max_iter=cap)
            cold_s = time.perf_counter() - t0
            z = model.last_z
            a, u = codes(z, hp, wp)
            res = {
                "cold": (
                    int(st.iterations[0]),
                    float(st.residual[0]),
                    bool(st.converged[0]),
                    cold_s,
                )
            }
            # warm from the neighbour's fixed point (left, else above)
            nb = fixed.get((t.index[0], t.index[1] - 1)) or fixed.get((t.index[0] - 1, t.index[1]))
            if nb is not None:
                nr, na, nu = nb
                ov = r.intersect(nr)
                a0 = torch.zeros_like(a)
                u0 = torch.zeros_like(u)
                if ov is not None:
                    me, them = ov.relative_to(r), ov.relative_to(nr)
                    a0[..., me.y0 : me.y1, me.x0 : me.x1] = na[
                        ..., them.y0 : them.y1, them.x0 : them.x1
                    ]
                    u0[..., me.y0 : me.y1, me.x0 : me.x1] = nu[
                        ..., them.y0 : them.y1, them.x0 : them.x1
                    ]
                t0 = time.perf_counter()
                _, stw = model(y, sigma, z0=pack(a0, u0), max_iter=cap)
                res["warm: neighbour"] = (
                    int(stw.iterations[0]),
                    float(stw.residual[0]),
                    bool(stw.converged[0]),
                    time.perf_counter() - t0,
                )
            # warm from a coarse (2× downsampled) solve
            t0 = time.perf_counter()
            yc = F.avg_pool2d(y, 2, ceil_mode=True)
            model(yc, sigma / 2, max_iter=cap)
            hc, wc = _pad8(yc.shape[-2], ws), _pad8(yc.shape[-1], ws)
            ac, uc = codes(model.last_z, hc, wc)
            a0 = F.interpolate(ac, scale_factor=2, mode="nearest")[..., :hp, :wp]
            u0 = F.interpolate(uc.flatten(1, 2), scale_factor=2, mode="nearest")[..., :hp, :wp]
            a0 = F.pad(a0, (0, wp - a0.shape[-1], 0, hp - a0.shape[-2]))
            u0 = F.pad(u0, (0, wp - u0.shape[-1], 0, hp - u0.shape[-2])).reshape(1, C, B, hp, wp)
            _, stc = model(y, sigma, z0=pack(a0, u0), max_iter=cap)
            res["warm: coarse"] = (
                int(stc.iterations[0]),
                float(stc.residual[0]),
                bool(stc.converged[0]),
                time.perf_counter() - t0,
            )
            fixed[t.index] = (r, a, u)
            row: dict[str, Any] = {"tile": str(t.index), "read px": f"{h}×{w}"}
            for k, v in res.items():
                agg[k].append(v)
                row[f"{k} iters"] = v[0]
                row[f"{k} residual"] = v[1]
            rows.append(row)
    summary = []
    for k, vals in agg.items():
        if not vals:
            continue
        it = np.array([v[0] for v in vals], float)
        summary.append(
            {
                "start": k,
                "tiles": len(vals),
                "iterations mean": it.mean(),
                "iterations max": it.max(),
                "residual max": max(v[1] for v in vals),
                "converged": f"{sum(v[2] for v in vals)}/{len(vals)}",
                "seconds total (incl. coarse solve)": sum(v[3] for v in vals),
            }
        )
    sec.tables["Summary (same tolerance, same cap)"] = summary
    sec.tables["Per tile"] = rows
    cold = next(s for s in summary if s["start"] == "cold")
    best = min(
        (s for s in summary if s["start"] != "cold"),
        key=lambda s: s["iterations mean"],
        default=None,
    )
    sec.values["cold_iterations_mean"] = cold["iterations mean"]
    sec.values["cold_residual_max"] = cold["residual max"]
    sec.values["cold_converged"] = cold["converged"]
    if best is not None:
        sec.values["warm_iterations_mean"] = best["iterations mean"]
        sec.values["warm_residual_max"] = best["residual max"]
        sec.values["warm_converged"] = best["converged"]
        sec.values["warm_best"] = best["start"]
        sec.targets.append(
            Target(
                f"iterations, {best['start']} ÷ cold",
                best["iterations mean"] / cold["iterations mean"],
                "< 1 at the same tolerance",
                best["iterations mean"] < cold["iterations mean"],
                "tiles that hit the cap count as the cap",
            )
        )
    sec.notes.append(
        f"DECSC ({wlabel}) on bands 0–{B - 1} of {plan.solver_crop.label}; tiles {plan.solver_tile} px + halo {halo}; "
        f"Anderson, tol {tol:g} (registry), cap {cap} iterations; the noise σ is estimated once on the whole crop "
        "so all three starts solve the same problem. The pipeline does not warm-start yet: this measures what it would gain."
    )
