"""CLI commands for the data plane's input side: ``hyperdeq ingest`` and ``hyperdeq info``."""

from __future__ import annotations

from pathlib import Path

import typer


def ingest(
    src: Path = typer.Argument(
        ..., help="Input scene: GeoTIFF/COG, ENVI, NetCDF/HDF5, .mat or zarr."
    ),
    dest: Path = typer.Argument(..., help="Output zarr v3 store (e.g. scene.zarr)."),
    chunk: int = typer.Option(256, "--chunk", help="Chunk edge in pixels (chunks hold all bands)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store."),
    format: str | None = typer.Option(
        None, "--format", help="Force the reader (geotiff, envi, netcdf, mat, zarr)."
    ),
    variable: str | None = typer.Option(
        None, "--variable", help="Variable to read (.mat / NetCDF)."
    ),
    dims: str | None = typer.Option(
        None,
        "--dims",
        help="NetCDF/HDF5: the band, y and x dim names, "
        "comma-separated (e.g. 'phony_dim_0,phony_dim_1,phony_dim_2').",
    ),
) -> None:
    """Stream a scene into a chunked, compressed, georeferenced zarr v3 store."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from pipeline.ingest import ingest_scene

    opts = {k: v for k, v in (("variable", variable), ("dims", dims)) if v}
    with Progress(
        TextColumn("ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("regions"),
        TimeRemainingColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task("ingest", total=None)

        def _progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        out = ingest_scene(
            src, dest, chunk=chunk, overwrite=overwrite, format=format, progress=_progress, **opts
        )
    typer.echo(f"wrote {out}")


def info(
    scene: Path = typer.Argument(..., help="Scene file or hyperdeq zarr store."),
    format: str | None = typer.Option(None, "--format", help="Force the reader."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    variable: str | None = typer.Option(
        None, "--variable", help="Variable to read (.mat / NetCDF)."
    ),
    dims: str | None = typer.Option(
        None, "--dims", help="NetCDF/HDF5: band, y and x dim names, comma-separated."
    ),
) -> None:
    """Print shape, bands and wavelength range, CRS, resolution, nodata fraction, bad bands, size."""
    import json

    from pipeline.info import format_info, scene_info

    opts = {k: v for k, v in (("variable", variable), ("dims", dims)) if v}
    meta = scene_info(scene, format=format, **opts)
    typer.echo(json.dumps(meta.as_dict(), indent=2) if json_out else format_info(meta))


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Add ``ingest`` and ``info`` to the top-level app."""
    app.command("ingest")(ingest)
    app.command("info")(info)
