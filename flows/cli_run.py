"""``hyperdeq run``: denoise and/or unmix one scene, tile by tile, on a local or remote Dask cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from flows.options import OUT_OPT, SCENE_ARG, add_run_options


def cli_logging(console: Any) -> None:
    """Stage messages (e.g. the unmixer fit's epochs) on the console."""
    import logging

    from rich.logging import RichHandler

    hlog = logging.getLogger("hyperdeq")
    hlog.setLevel(logging.INFO)
    if not any(isinstance(h, RichHandler) for h in hlog.handlers):
        hlog.addHandler(RichHandler(console=console, show_path=False, show_level=False))


@add_run_options()
def run(
    scene: Path = SCENE_ARG,
    out: Path = OUT_OPT,
    options: Any = None,
) -> None:
    """Denoise (DECSC) and unmix (DEQ-Unmix) SCENE into georeferenced zarr + COG with a run record."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from flows.options import options_to_build
    from workers.run import RunCancelled, run_scene

    job, cluster = options_to_build(options, out)
    console = Console(stderr=True)
    cli_logging(console)
    with Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        tasks: dict[str, Any] = {}

        def _progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        try:
            res = run_scene(
                scene,
                job,
                cluster,
                progress=_progress,
                on_plan=lambda p: console.print(f"run {p.run_id} in {p.run_dir}"),
            )
        except RunCancelled as exc:
            typer.secho(
                f"run cancelled ({exc}); rerun the same command to resume",
                fg=typer.colors.YELLOW,
                err=True,
            )
            raise typer.Exit(exc.exit_code) from None
    typer.echo(
        f"run {res.run_id}: {res.status}{' (reused an identical completed run)' if res.reused else ''}"
    )
    typer.echo(f"outputs in {res.run_dir}")
    for key, path in sorted(res.outputs.items()):
        typer.echo(f"  {key:<22} {path}")
    typer.echo(f"  {'run record':<22} {res.run_dir / 'run.json'}")
    if res.failed_tiles:
        typer.secho(
            f"{len(res.failed_tiles)} tiles failed: {res.failed_tiles}; rerun the same command to "
            "retry them",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
    if res.not_converged:
        typer.secho(
            f"{len(res.not_converged)} tiles did not converge: {res.not_converged}",
            fg=typer.colors.YELLOW,
            err=True,
        )


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Add ``run`` to the top-level app."""
    app.command("run")(run)
