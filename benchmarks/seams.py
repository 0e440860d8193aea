"""Seam benchmark: tiled-and-blended model output vs the same model on the whole scene at once.

On the real EnMAP Potsdam demo mosaic (good bands, NaN nodata), a model -- the shipped DECSC
denoiser (``--model decsc``) or DEQ-Unmix fitted to the scene (``--model deq-unmix``) -- is
applied (1) to the whole scene in one call and (2) tile by tile through the project's own tile
engine (input tile store → :func:`pipeline.runner.run_tiles` → :func:`pipeline.blend.blend_stage`)
with each blend window (hann, uniform, crop). Reported per window, over valid pixels: max abs error
and PSNR between the tiled and the whole-scene result (peak 1.0 = reflectance full scale), plus the
seam ratio: gradient energy across tile-core borders divided by the gradient energy elsewhere,
relative to the same ratio in the whole-scene result (1.0 = no visible seams). For DEQ-Unmix
the compared channels are the abundances (peak 1.0), not the RMSE map.

Run: ``nice -n 10 python -m benchmarks.seams [--model decsc|deq-unmix] [--tile 64 --halo 16 --crop 96]``.
Writes ``benchmarks/results/seams.json`` and ``docs/benchmarks/seams.md`` (DECSC), or
``seams_unmix.json`` and ``seams_unmix.md`` (DEQ-Unmix).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.provenance import portable

ROOT = Path(__file__).resolve().parents[1]
MOSAIC = ROOT / "tests" / "data" / "demo" / "enmap_potsdam_mosaic_18tiles.tif"
#: per model: results JSON and markdown report
OUTPUTS = {
    "decsc": (
        ROOT / "benchmarks" / "results" / "seams.json",
        ROOT / "docs" / "benchmarks" / "seams.md",
    ),
    "deq-unmix": (
        ROOT / "benchmarks" / "results" / "seams_unmix.json",
        ROOT / "docs" / "benchmarks" / "seams_unmix.md",
    ),
}


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    mse = float(np.nanmean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def seam_ratio(x: np.ndarray, ref: np.ndarray, grid: Any) -> float:
    """(border / interior gradient energy of ``x``) ÷ (the same for ``ref``), both axes."""
    ratios = []
    for axis, starts in (
        (2, sorted({t.core.x0 for t in grid.tiles} - {0})),
        (1, sorted({t.core.y0 for t in grid.tiles} - {0})),
    ):
        if not starts:
            continue
        dx, dr = np.diff(x, axis=axis) ** 2, np.diff(ref, axis=axis) ** 2
        sel = np.zeros(dx.shape[axis], bool)
        sel[[s - 1 for s in starts]] = True

        def pick(d: np.ndarray, m: np.ndarray, ax: int = axis) -> float:
            return float(np.nanmean(np.compress(m, d, axis=ax)))

        ratios.append((pick(dx, sel) / pick(dx, ~sel)) / (pick(dr, sel) / pick(dr, ~sel)))
    return float(np.mean(ratios)) if ratios else float("nan")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="decsc", choices=("decsc", "deq-unmix"))
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--halo", type=int, default=None, help="default: the model spec's halo")
    ap.add_argument("--endmembers", type=int, default=4, help="deq-unmix: number of endmembers")
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="deq-unmix: fit epochs (default: the fit's default)",
    )
    ap.add_argument(
        "--fit-options",
        type=json.loads,
        default=None,
        help="deq-unmix: fit options as JSON, e.g. '{\"val_every\": 0}' (no early stopping: "
        "the net trains every epoch, the worst case for seams)",
    )
    ap.add_argument(
        "--crop", type=int, default=0, help="use the top-left CROP x CROP px only (0: whole mosaic)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite the markdown report")
    ap.add_argument(
        "--no-guard",
        action="store_true",
        help="decsc: the model alone, without its band guard (default files *_noguard)",
    )
    ap.add_argument(
        "--subspace",
        type=int,
        default=8,
        help="decsc: spectral-subspace pass dimension as in the pipeline (0: off, files *_nosub)",
    )
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        help="results JSON (default: the model's file in benchmarks/results)",
    )
    ap.add_argument(
        "--md",
        type=Path,
        default=None,
        help="markdown report (default: the model's file in docs/benchmarks)",
    )
    args = ap.parse_args(argv)

    import torch

    from pipeline import tiles as ts
    from pipeline.blend import BlendTarget, blend_stage
    from pipeline.grid import plan_grid
    from pipeline.provenance import code_version, cpu_model, package_versions
    from pipeline.readers import open_scene
    from pipeline.runner import run_tiles
    from pipeline.scene import good_band_index, valid_mask
    from workers.registry import get_spec

    torch.set_num_threads(args.threads)
    spec = get_spec(args.model)
    halo = spec.halo if args.halo is None else args.halo
    scene = open_scene(MOSAIC)
    if args.crop:
        scene = scene.isel(y=slice(0, args.crop), x=slice(0, args.crop))
    scene = scene.load()
    good = good_band_index(scene)
    valid = valid_mask(scene).values
    cube = np.asarray(scene.values[good], dtype=np.float32)

    grid = plan_grid(cube.shape[1:], args.tile, halo, valid)
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(1) as ex:
        t0 = time.perf_counter()
        if args.model == "decsc":
            from workers.denoise.api import denoise_cube, load_denoiser
            from workers.infer import DenoiseTileModel

            guard = not args.no_guard
            whole, wstats = denoise_cube(
                load_denoiser(args.device),
                cube,
                device=args.device,
                guard="apply" if guard else "off",
                subspace=args.subspace or 0,
            )
            tile_model: Any = DenoiseTileModel(
                args.device, halo, spec.weights_sha256, guard=guard, subspace=args.subspace
            )
            extra = {"band_guard": guard, "subspace_k": args.subspace}
            names, compared, weights = [str(b) for b in good], len(good), spec.weights_sha256
        else:
            from pipeline.hashing import sha256_tree as dir_sha256
            from workers.infer import UnmixTileModel
            from workers.unmix.fit import apply_fit, fit_scene

            kw = {"max_epochs": args.epochs} if args.epochs else {}
            fit = fit_scene(scene, args.endmembers, seed=0, options=args.fit_options, **kw)
            fit.save(Path(tmp) / "fit")
            net_abs = max(float(p.detach().abs().max()) for p in fit.model().net.parameters())
            extra = {
                "fit_s": round(time.perf_counter() - t0, 2),
                "endmembers": args.endmembers,
                "fit_epochs": args.epochs or "default",
                "fit_options": args.fit_options or {},
                "fit_best_epoch": fit.provenance.get("best_epoch"),
                "fit_net_output_zero": _net_output_zero(fit),
                "fit_mixing": "scaled" if fit.config.get("scaled") else "linear",
                "net_max_abs_weight": net_abs,
            }
            t0 = time.perf_counter()
            A, rmse, wstats = apply_fit(fit, cube)
            whole = np.concatenate([A, rmse[None]], axis=0)
            tile_model = UnmixTileModel.from_fit(Path(tmp) / "fit", args.device)
            if args.halo is not None:
                tile_model = dataclasses.replace(tile_model, halo=halo)
            names, compared = list(tile_model.out_names or ()), A.shape[0]
            weights = dir_sha256(Path(tmp) / "fit")
        t_whole = time.perf_counter() - t0
        nch = len(names)
        store = ts.write_input_tiles(scene, grid, Path(tmp) / "in.zarr", bands=good)
        ts.write_valid_mask(valid, store, args.tile)
        dest = ts.create_output_store(Path(tmp) / "d.zarr", grid, names)
        t0 = time.perf_counter()
        res = run_tiles(ex, tile_model, store, dest, grid)
        t_tiles = time.perf_counter() - t0
        if res.failed:
            raise SystemExit(f"tiles failed: {res.failed[:3]}")
        import zarr

        mix = None
        if (
            args.model == "decsc" and not args.no_guard
        ):  # as workers.run blends: one weight per band
            from pipeline.tiles import load_records
            from workers.denoise.guard import scene_weights

            mix = scene_weights(r.get("stats") for _, r in sorted(load_records(dest).items()))
            extra["guard_w_scene_mean"] = None if mix is None else round(float(mix.mean()), 4)
            extra["guard_w_whole_mean"] = round(float(wstats.get("guard_w_mean", float("nan"))), 4)

        for window in ("hann", "uniform", "crop"):
            tgt = Path(tmp) / f"{window}.zarr"
            zarr.create_array(
                str(tgt),
                shape=(nch, *cube.shape[1:]),
                chunks=(nch, args.tile, args.tile),
                dtype="float32",
                fill_value=np.nan,
            )
            blend_stage(
                ex,
                dest,
                store,
                grid,
                [BlendTarget(str(tgt), tuple(range(nch)), tuple(range(nch)))],
                chunk=args.tile,
                blend=window,
                mix=None if mix is None else mix.tolist(),
            )
            tiled = np.asarray(zarr.open_array(str(tgt), mode="r")[...])[:compared]
            ref = whole[:compared]
            m = valid[None].repeat(compared, 0)
            out[window] = {
                "max_abs_error": float(np.nanmax(np.abs(tiled[m] - ref[m]))),
                "psnr_db": psnr(tiled[m], ref[m]),
                "seam_ratio": seam_ratio(tiled, ref, grid),
            }
    result = {
        "model": args.model,
        **extra,
        "scene": str(MOSAIC.relative_to(ROOT)),
        "shape": [len(good), *cube.shape[1:]],
        "crop": args.crop,
        "tile": args.tile,
        "halo": halo,
        "n_tiles": len(grid.tiles),
        "valid_fraction": float(valid.mean()),
        "whole_scene_s": round(t_whole, 2),
        "tiles_s": round(t_tiles, 2),
        "whole_stats": wstats,
        "not_converged_tiles": [r["key"] for r in res.not_converged],
        "windows": out,
        "device": args.device if args.device != "cpu" else f"CPU ({cpu_model()})",
        "threads": args.threads,
        "weights_sha256": weights,
        "code_version": code_version(),
        "versions": {
            k: v for k, v in package_versions().items() if k in ("torch", "numpy", "zarr", "dask")
        },
        "python": platform.python_version(),
        "command": portable(
            "python -m benchmarks.seams " + " ".join(argv if argv is not None else sys.argv[1:])
        ),
    }
    results, doc = OUTPUTS[args.model]
    if args.model == "decsc" and args.no_guard:
        results, doc = (p.with_name(p.stem + "_noguard" + p.suffix) for p in (results, doc))
    if args.model == "decsc" and not args.subspace:
        results, doc = (p.with_name(p.stem + "_nosub" + p.suffix) for p in (results, doc))
    results, doc = args.json or results, args.md or doc
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=1))
    if not args.no_doc:
        write_doc(result, doc, results)
    print(json.dumps(out, indent=1))
    return result


def _net_output_zero(fit: Any) -> bool:
    """True when the fit kept the net's zero output layer (the map is then per pixel: FCLS, or its
    scale-free variant with the scaled mixing model)."""
    last = [m for m in fit.model().net.modules() if hasattr(m, "weight")][-1]
    return bool(float(last.weight.detach().abs().max()) == 0.0)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def write_doc(r: dict[str, Any], doc: Path, results: Path) -> None:
    rows = "\n".join(
        f"| {w} | {v['max_abs_error']:.2e} | {v['psnr_db']:.1f} | {v['seam_ratio']:.3f} |"
        for w, v in r["windows"].items()
    )
    unmix = r.get("model") == "deq-unmix"
    if unmix:
        title = "DEQ-Unmix"
        kept = (
            "its net's output layer is still zero (the fit kept its start), so the fixed point is "
            "per pixel and tiling cannot change it"
            if r.get("fit_net_output_zero")
            else "its net was trained (non-zero output layer): every solver iteration mixes 3x3 "
            "neighbourhoods, so the halo matters"
        )
        what = (
            f"DEQ-Unmix fitted blindly to the scene ({r['endmembers']} endmembers, seed 0, epochs "
            f"{r['fit_epochs']}, fit options {r.get('fit_options') or 'default'}, mixing model "
            f"{r.get('fit_mixing', 'linear')}, fit {r['fit_s']} s; "
            f"{kept}), then applied"
        )
        units = "Errors are over valid pixels, in abundance units (the P abundance maps; PSNR peak 1.0)."
        weights = f"- fit directory sha256: `{r['weights_sha256']}`"
    else:
        title = "DECSC" + ("" if r.get("band_guard", True) else " (model alone, no band guard)")
        what = (
            "the shipped DECSC denoiser with its band guard (whole scene: the guard's weights from "
            "the whole scene; tiled: one weight per band, the tiles' weights averaged by valid pixels, "
            "applied when the tiles are blended, as `hyperdeq run` does) applied"
            if r.get("band_guard", True)
            else "the shipped DECSC denoiser without its band guard applied"
        )
        k = r.get("subspace_k", 0)
        what += (
            f", with its spectral-subspace pass (k = {k}; each tile projects onto its own top-{k} "
            "spectral directions, the whole scene onto the scene's)"
            if k
            else ", without the spectral-subspace pass (the model alone)"
        )
        title += "" if k else " without the subspace pass"
        units = "Errors are over valid pixels, reflectance units (PSNR peak 1.0)."
        weights = f"- weights sha256: `{r['weights_sha256']}`"
    crop = f", top-left {r['crop']} × {r['crop']} px crop" if r.get("crop") else ""
    guard_line = (
        f"\n- band guard weights (mean over bands): whole scene {r['guard_w_whole_mean']}, tiled "
        f"(tiles averaged) {r['guard_w_scene_mean']}"
        if r.get("guard_w_scene_mean") is not None
        else ""
    )
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(f"""# Seams: tiled-and-blended vs whole-scene {title}

What: {what} to the real EnMAP Potsdam demo mosaic
(`{r["scene"]}`{crop}, {r["shape"][0]} good bands × {r["shape"][1]} × {r["shape"][2]} px,
{100 * r["valid_fraction"]:.0f} % valid pixels) once on the whole scene and once through the tile
engine (tile {r["tile"]} px, halo {r["halo"]} px, {r["n_tiles"]} tiles, then per-chunk blending).
{units} Seam ratio: gradient energy across
tile-core borders ÷ elsewhere, relative to the same ratio in the whole-scene result (1.0: no seam).

| blend window | max abs error | PSNR vs whole scene (dB) | seam ratio |
|---|---|---|---|
{rows}

- whole scene in one call: {r["whole_scene_s"]} s; all tiles (one worker thread): {r["tiles_s"]} s{guard_line}
- tiles whose solver did not converge: {r["not_converged_tiles"] or "none"}
- device: {r["device"]}, {r["threads"]} torch threads; versions {r["versions"]}; Python {r["python"]}
{weights}; code: `{r["code_version"]}`
- command: `{r["command"]}` (results also in `{_rel(results)}`)
""")


if __name__ == "__main__":
    main()
