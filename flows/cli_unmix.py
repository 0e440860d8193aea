"""CLI commands of the unmixing area: ``hyperdeq eval unmixer`` and ``hyperdeq unmix``."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

_ROOT = Path(__file__).resolve().parents[1]

#: fit_scene's default (workers.unmix.fit.DEFAULT_EPOCHS), kept here so that --help needs no torch
DEFAULT_EPOCHS = 60


def eval_unmixer(
    data: Path = typer.Option(_ROOT.parent / "shared" / "data", help="shared real-data folder"),
    scenes: str = typer.Option(
        "samson,jasper,synthetic,synthetic_var",
        help="comma list: samson, jasper, synthetic (i.i.d. Dirichlet mixtures), synthetic_var "
        "(smooth maps, illumination, endmember variability)",
    ),
    out: Path = typer.Option(
        _ROOT / "docs" / "benchmarks" / "unmix_eval.md", help="markdown report"
    ),
    json_out: Path = typer.Option(
        _ROOT / "benchmarks" / "results" / "unmix_eval.json", help="JSON report"
    ),
    epochs: int = typer.Option(
        DEFAULT_EPOCHS, help="DEQ-Unmix fit epochs (max Adam steps, early stopping) per scene"
    ),
    seed: int = typer.Option(0, help="seed of sampling, VCA, N-FINDR, synthetic data and training"),
    seeds: str = typer.Option(
        "",
        help="comma list of seeds (overrides --seed); every scene runs for each, "
        "scene by scene, into one report",
    ),
    threads: int = typer.Option(2, help="torch threads"),
) -> None:
    """DEQ-Unmix vs FCLS with the DEQ's endmembers (ablation), VCA+FCLS and N-FINDR+FCLS on Samson
    (tuning), Jasper Ridge (reported) and USGS synthetics with and without spectral variability
    (tuning)."""
    import warnings

    import torch

    from pipeline.scene import MissingCRSWarning
    from workers.unmix.evaluate import environment, load_cases, run_case, write_report

    warnings.simplefilter("ignore", MissingCRSWarning)
    torch.set_num_threads(threads)
    names = [s.strip() for s in scenes.split(",") if s.strip()]
    seed_list = [int(s) for s in seeds.split(",") if s.strip()] or [seed]
    results = []
    for name in names:  # scene by scene, every seed: a run cut short keeps whole scenes
        for sd in seed_list:
            for case in load_cases(data, [name], seed=sd):
                typer.echo(f"{case.name} seed {sd}: {case.cube.shape}")
                r = run_case(case, seed=sd, max_epochs=epochs)
                results.append(r)
                for m in ("deq-unmix", "deq-no-net", "fcls-same-e", "vca+fcls", "nfindr+fcls"):
                    v = r[m]
                    typer.echo(
                        f"  {m:12s} SAD {v['sad_mean_deg']:6.2f}°  aRMSE {v['abundance_rmse']:.4f}  "
                        f"{v['time_s']:.1f} s"
                    )
                write_report(
                    results,
                    environment(),
                    "hyperdeq " + " ".join(sys.argv[1:]),
                    out,
                    json_out,
                    {"epochs": epochs, "seeds": seed_list, "threads": threads},
                )
    typer.echo(f"wrote {out} and {json_out}")


def unmix(
    scene: Path = typer.Argument(..., help="input scene (any format open_scene reads)"),
    out: Path = typer.Option(..., "--out", help="output directory"),
    p: int = typer.Option(0, "-p", help="number of endmembers (0: estimate with HySime)"),
    epochs: int = typer.Option(DEFAULT_EPOCHS, help="fit epochs (max Adam steps, early stopping)"),
    seed: int = typer.Option(0),
) -> None:
    """Fit DEQ-Unmix to one scene and write abundances (.npy), RMSE map, endmembers, fit."""
    import json

    import numpy as np

    from pipeline.readers import open_scene
    from pipeline.scene import good_band_index
    from workers.unmix.fit import apply_fit, fit_scene, write_endmembers

    da = open_scene(scene)
    fit = fit_scene(da, p or None, seed=seed, max_epochs=epochs)
    out.mkdir(parents=True, exist_ok=True)
    fit.save(out / "fit")
    write_endmembers(fit, out / "endmembers.csv", out / "endmembers.json")
    cube = np.asarray(da.isel(band=good_band_index(da)).values, dtype=np.float32)
    A, rmse, stats = apply_fit(fit, cube)
    np.save(out / "abundances.npy", A)
    np.save(out / "rmse.npy", rmse)
    (out / "stats.json").write_text(json.dumps(stats))
    typer.echo(f"P = {fit.n_endmembers}; mixing {fit.mixing}; solver {stats}; wrote {out}")


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Add ``eval unmixer`` and ``unmix`` to the app."""
    groups["eval"].command("unmixer")(eval_unmixer)
    app.command("unmix")(unmix)
