"""``hyperdeq run``: denoise and/or unmix one scene, tile by tile, on a local or remote Dask cluster."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Add ``run`` to the top-level app."""

    @app.command("run")
    def run(
        scene: Path = typer.Argument(..., help="Input scene (GeoTIFF/COG, ENVI, NetCDF/HDF5, .mat, zarr)."),
        out: Path = typer.Option(..., "--out", help="Output root; the run lands in OUT/<scene>/<run id>/."),
        denoise: bool = typer.Option(True, "--denoise/--no-denoise", help="Run the DECSC denoiser."),
        unmix: int | None = typer.Option(None, "--unmix", help="Unmix with N endmembers (default: estimate N)."),
        no_unmix: bool = typer.Option(False, "--no-unmix", help="Skip unmixing."),
        tile: int = typer.Option(128, "--tile", help="Tile core size in pixels."),
        halo: int | None = typer.Option(None, "--halo", help="Context pixels each side (default: the models' halo)."),
        blend: str = typer.Option("hann", "--blend", help="Blend window: hann, uniform or crop."),
        workers: int | None = typer.Option(None, "--workers", help="Start a local cluster of N workers (default 2)."),
        scheduler: str | None = typer.Option(None, "--scheduler", help="Use an existing Dask scheduler (host:port)."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
        batch: int = typer.Option(4, "--batch", help="Tiles per task."),
        seed: int = typer.Option(0, "--seed", help="Seed of the unmixer fit."),
        denoiser: str = typer.Option("shipped", "--denoiser",
                                     help="DECSC weights: shipped (small, default) or full (full-size; for GPUs)."),
        guard: bool = typer.Option(True, "--guard/--no-guard",
                                   help="DECSC's band guard: hand the input back per band where the model over-smooths."),
        subspace: int = typer.Option(8, "--subspace",
                                     help="DECSC's spectral-subspace pass: dimension k of the projection between "
                                          "two model passes (0: the model alone, half the compute)."),
        tile_memory: float = typer.Option(3072.0, "--tile-memory",
                                          help="Per-tile memory budget of a worker in MiB; a tile estimated "
                                               "above it is refused before any work."),
    ) -> None:
        """Denoise (DECSC) and unmix (DEQ-Unmix) SCENE into georeferenced zarr + COG with a run record."""
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        from pipeline.config import RunConfig
        from pipeline.errors import ConfigError
        from workers.run import run_scene

        if no_unmix and unmix is not None:
            raise ConfigError(f"--unmix {unmix!r} and --no-unmix contradict each other; give one")
        cfg = RunConfig(
            out_root=out, tile=tile, halo=halo, blend=blend, denoise=denoise, unmix=not no_unmix,
            n_endmembers=unmix, seed=seed, workers=workers, scheduler=scheduler, device=device,
            batch_size=batch, denoise_arch=denoiser, denoise_guard=guard,
            denoise_subspace=subspace, tile_memory_mb=tile_memory,
        )
        console = Console(stderr=True)
        import logging

        from rich.logging import RichHandler

        hlog = logging.getLogger("hyperdeq")  # stage messages (e.g. the unmixer fit's epochs)
        hlog.setLevel(logging.INFO)
        if not any(isinstance(h, RichHandler) for h in hlog.handlers):
            hlog.addHandler(RichHandler(console=console, show_path=False, show_level=False))
        with Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as bar:
            tasks: dict[str, int] = {}

            def _progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done, total=total)

            res = run_scene(scene, out, cfg, progress=_progress)
        typer.echo(f"run {res.run_id}: {res.status}{' (reused an identical completed run)' if res.reused else ''}")
        typer.echo(f"outputs in {res.run_dir}")
        for key, path in sorted(res.outputs.items()):
            typer.echo(f"  {key:<22} {path}")
        typer.echo(f"  {'run record':<22} {res.run_dir / 'run.json'}")
        if res.failed_tiles:
            typer.secho(f"{len(res.failed_tiles)} tiles failed: {res.failed_tiles}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        if res.not_converged:
            typer.secho(f"{len(res.not_converged)} tiles did not converge: {res.not_converged}",
                        fg=typer.colors.YELLOW, err=True)
