"""CLI commands that go through Prefect: ``flow run``, ``sweep``, ``serve`` and ``demo``.

Heavy imports (prefect, the flows) happen inside the commands so ``hyperdeq --help`` stays fast.
Parameter errors are turned into :class:`pipeline.errors.ConfigError` (one clear line, exit 2).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from pipeline.errors import ConfigError


def _options(**kw: Any) -> Any:
    """Build (RunOptions, ClusterOptions) from CLI values, turning pydantic errors into ConfigError."""
    from pydantic import ValidationError

    from flows.settings import ClusterOptions, RunOptions

    run_keys = set(RunOptions.model_fields)
    try:
        opts = RunOptions(**{k: v for k, v in kw.items() if k in run_keys and v is not None})
        ckw = {k: v for k, v in kw.items() if k in ClusterOptions.model_fields and v is not None}
        cluster = ClusterOptions(**ckw)
    except ValidationError as exc:
        raise ConfigError(_pretty(exc)) from None
    return opts, cluster


def _pretty(exc: Any) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ())) or "parameters"
        parts.append(f"{loc}: {str(e.get('msg')).removeprefix('Value error, ')}")
    return "; ".join(parts)


def _ui_hint(flow_run_id: Any) -> str:
    """Where to look at a flow run in the Prefect UI."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    api = PREFECT_API_URL.value()
    if api:
        ui = str(api).rstrip("/").removesuffix("/api")
        return f"Prefect UI: {ui}/runs/flow-run/{flow_run_id}"
    return (
        "Prefect ran on a temporary local server; the run is stored in "
        f"{Path(str(PREFECT_HOME.value())) / 'prefect.db'}. To see it in the UI: "
        "`prefect server start` (then http://127.0.0.1:4200/runs/flow-run/"
        f"{flow_run_id}). Set PREFECT_API_URL=http://127.0.0.1:4200/api to report to a running server."
    )


@contextmanager
def _prefect_defaults() -> Iterator[None]:
    """Give a temporary (ephemeral) Prefect server time to start on a busy machine.

    Prefect's default startup timeout is short; without ``PREFECT_API_URL`` every command starts
    its own temporary server, which can take well over 20 s on a loaded 2-core machine.
    """
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    # the temporary server's usage telemetry: off unless the user asks for it (clusters are often
    # offline, and each failed send logs an error that looks like a pipeline failure)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ:
        yield
        return
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        yield


def _decsc_available() -> bool:
    from pipeline.errors import HyperdeqError
    from workers.registry import get_spec, verified_weights_path

    try:
        verified_weights_path(get_spec("decsc"))
        return True
    except (HyperdeqError, ImportError):
        return False


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Add ``flow run`` (to the ``flow`` group) and ``sweep``, ``serve``, ``demo`` (top level)."""
    flow_app = groups["flow"]

    @flow_app.command("run")
    def flow_run(
        scene: Path = typer.Argument(..., help="scene file (GeoTIFF, ENVI, NetCDF, .mat) or zarr store"),
        out: Path = typer.Option(Path("hyperdeq-out"), "--out", help="output root; the run goes in OUT/<scene>/<run id>/"),
        tile: int = typer.Option(128, help="tile core size (px)"),
        halo: int | None = typer.Option(None, help="context px each side (default: what the models need)"),
        blend: str = typer.Option("hann", help="hann, uniform or crop"),
        denoise: bool = typer.Option(True, "--denoise/--no-denoise"),
        unmix: bool = typer.Option(True, "--unmix/--no-unmix"),
        endmembers: int | None = typer.Option(None, "--endmembers", help="number of endmembers (default: estimated)"),
        seed: int = typer.Option(0),
        device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto"),
        batch_size: int = typer.Option(4, help="tiles per Dask task"),
        cluster: str = typer.Option("local", help="local, address or cuda"),
        address: str | None = typer.Option(None, help="scheduler address for --cluster address"),
        workers: int | None = typer.Option(None, help="local worker processes"),
        recipe: str | None = typer.Option(None, help="deploy/cluster recipe (local, gpu-dask-cuda, or a path)"),
        denoiser: str = typer.Option("shipped", help="DECSC weights: shipped (small, default) or full (for GPUs)"),
        guard: bool = typer.Option(True, "--guard/--no-guard", help="DECSC's band guard after the model"),
        subspace: int = typer.Option(8, "--subspace", help="DECSC's spectral-subspace pass dimension (0: off)"),
        tile_memory: float | None = typer.Option(None, "--tile-memory",
                                                 help="per-tile memory budget in MiB (default 3072); larger tiles are refused"),
    ) -> None:
        """Process one scene through the Prefect flow (ingest → denoise → unmix → outputs)."""
        opts, cl = _options(tile=tile, halo=halo, blend=blend, denoise=denoise, unmix=unmix,
                            n_endmembers=endmembers, seed=seed, device=device, batch_size=batch_size,
                            kind=cluster, address=address, n_workers=workers, recipe=recipe,
                            denoise_arch=denoiser, denoise_guard=guard, denoise_subspace=subspace,
                            tile_memory_mb=tile_memory)
        if not scene.exists():
            raise ConfigError(f"scene {str(scene)!r} does not exist; give the path of a scene file")
        from flows.scene_flow import process_scene

        with _prefect_defaults():
            state = process_scene(scene=str(scene), out_dir=str(out), options=opts, cluster=cl,
                                  return_state=True)
        run_id = state.state_details.flow_run_id
        if not state.is_completed():
            typer.secho(f"flow run failed: {state.message}", fg=typer.colors.RED, err=True)
            typer.echo(_ui_hint(run_id))
            raise typer.Exit(1)
        typer.echo(f"run record: {state.result()}")
        typer.echo(_ui_hint(run_id))

    @app.command("sweep")
    def sweep(
        root: Path | None = typer.Argument(None, help="archive root to scan (or use --list-file)"),
        list_file: Path | None = typer.Option(None, "--list-file", help="text file, one scene path per line"),
        out: Path = typer.Option(Path("hyperdeq-out"), "--out", help="output root"),
        sensor: list[str] | None = typer.Option(None, "--sensor", help="sensor preset(s) from deploy/sensors.yaml"),
        pattern: list[str] | None = typer.Option(None, "--pattern", help="glob pattern(s) relative to ROOT"),
        max_concurrent: int = typer.Option(2, help="scenes processed at the same time"),
        tile: int = typer.Option(128),
        denoise: bool = typer.Option(True, "--denoise/--no-denoise"),
        unmix: bool = typer.Option(True, "--unmix/--no-unmix"),
        endmembers: int | None = typer.Option(None, "--endmembers"),
        device: str = typer.Option("cpu"),
        cluster: str = typer.Option("local"),
        address: str | None = typer.Option(None),
        workers: int | None = typer.Option(None),
        denoiser: str = typer.Option("shipped", help="DECSC weights: shipped (small, default) or full (for GPUs)"),
        guard: bool = typer.Option(True, "--guard/--no-guard", help="DECSC's band guard after the model"),
        subspace: int = typer.Option(8, "--subspace", help="DECSC's spectral-subspace pass dimension (0: off)"),
        tile_memory: float | None = typer.Option(None, "--tile-memory",
                                                 help="per-tile memory budget in MiB (default 3072); larger tiles are refused"),
    ) -> None:
        """Process every scene under ROOT (or in --list-file) that has no completed run yet."""
        from pydantic import ValidationError

        from flows.settings import SweepParams

        opts, cl = _options(tile=tile, denoise=denoise, unmix=unmix, n_endmembers=endmembers,
                            device=device, kind=cluster, address=address, n_workers=workers,
                            denoise_arch=denoiser, denoise_guard=guard, denoise_subspace=subspace,
                            tile_memory_mb=tile_memory)
        try:
            p = SweepParams(root=None if root is None else str(root),
                            list_file=None if list_file is None else str(list_file), out_root=str(out),
                            sensors=sensor or None, patterns=pattern or None,
                            max_concurrent=max_concurrent, options=opts, cluster=cl)
        except ValidationError as exc:
            raise ConfigError(_pretty(exc)) from None
        from flows.sweep import sweep_archive

        with _prefect_defaults():
            state = sweep_archive(**p.model_dump(exclude={"options", "cluster"}), options=opts,
                                  cluster=cl, return_state=True)
        if not state.is_completed():
            typer.secho(f"sweep failed: {state.message}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        s = state.result()
        typer.echo(f"processed {len(s['processed'])}, skipped {len(s['skipped'])} (already complete), "
                   f"failed {len(s['failed'])}")
        for f in s["failed"]:
            typer.echo(f"  failed: {f['scene']}: {f['reason']}")
        typer.echo(_ui_hint(state.state_details.flow_run_id))
        if s["failed"]:
            raise typer.Exit(1)

    @app.command("serve")
    def serve(
        sweep_root: Path | None = typer.Option(None, help="archive root for the scheduled sweep"),
        sweep_out: Path = typer.Option(Path("hyperdeq-out"), help="output root of the scheduled sweep"),
        cron: str = typer.Option("0 2 * * *", help="sweep schedule (cron, UTC); needs --sweep-root"),
        limit: int = typer.Option(2, help="flow runs executed at the same time"),
    ) -> None:
        """Serve the deployments (on-demand process-scene, nightly sweep) from this process."""
        from prefect import serve as prefect_serve
        from prefect.settings import PREFECT_API_URL

        from flows.scene_flow import process_scene
        from flows.sweep import sweep_archive

        if not PREFECT_API_URL.value():
            typer.secho(
                "warning: PREFECT_API_URL is not set; serving against a temporary server that no one "
                "else can reach. Start `prefect server start` and export "
                "PREFECT_API_URL=http://127.0.0.1:4200/api first.", fg=typer.colors.YELLOW, err=True)
        deployments = [process_scene.to_deployment(name="on-demand", tags=["hyperdeq", "scene"])]
        kw: dict[str, Any] = {"name": "nightly-sweep", "tags": ["hyperdeq", "sweep"]}
        if sweep_root is not None:
            kw.update(cron=cron, parameters={"root": str(sweep_root), "out_root": str(sweep_out)})
        deployments.append(sweep_archive.to_deployment(**kw))
        typer.echo("serving process-scene/on-demand and sweep-archive/nightly-sweep; Ctrl-C to stop")
        prefect_serve(*deployments, limit=limit)

    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("demo-output"), "--out", help="where the outputs go"),
        workers: int = typer.Option(1, help="local Dask worker processes"),
        tile: int = typer.Option(64, help="tile core size (px)"),
        full: bool = typer.Option(False, "--full", help="the whole 192×160 px mosaic instead of the 96×96 px "
                                  "window (about 3× the work: ~4 min instead of ~1.5 min on 2 idle cores)"),
        denoiser: str = typer.Option("shipped", help="DECSC weights: shipped (small, default) or full "
                                     "(full-size: ~7× the compute on a CPU)"),
    ) -> None:
        """Run the full flow on the bundled EnMAP Potsdam demo scene and say where to look.

        By default a 96 × 96 px window of the real EnMAP mosaic (written, georeferenced, to
        OUT/input/) goes through ingest, tiling, DECSC denoising, DEQ-Unmix unmixing, blending
        and the georeferenced writers: a few minutes on a 2-core CPU. ``--full`` takes the mosaic.
        """
        from flows.settings import DEMO_SCENE, DEMO_WINDOW
        from pipeline.readers.geotiff import crop_geotiff

        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(workers, 1))))
        if not DEMO_SCENE.is_file():
            raise ConfigError(f"demo scene {str(DEMO_SCENE)!r} is missing; reinstall hyperdeq from a checkout")
        denoise = _decsc_available()
        if not denoise:
            typer.secho("warning: the DECSC weights are not installed (workers/weights/decsc.safetensors); "
                        "the demo runs unmixing only.", fg=typer.colors.YELLOW, err=True)
        opts, cl = _options(tile=tile, denoise=denoise, unmix=True, n_workers=workers, denoise_arch=denoiser)
        scene_path = DEMO_SCENE
        if not full:
            r0, r1, c0, c1 = DEMO_WINDOW
            scene_path = crop_geotiff(DEMO_SCENE, out / "input" / f"enmap_potsdam_demo_{r1 - r0}x{c1 - c0}.tif",
                                      DEMO_WINDOW)
        from flows.scene_flow import process_scene

        typer.echo(f"hyperdeq demo: {scene_path.name} -> {out.resolve()}")
        with _prefect_defaults():
            state = process_scene(scene=str(scene_path), out_dir=str(out), options=opts, cluster=cl,
                                  return_state=True)
        run_id = state.state_details.flow_run_id
        if not state.is_completed():
            typer.secho(f"demo failed: {state.message}", fg=typer.colors.RED, err=True)
            typer.echo(_ui_hint(run_id))
            raise typer.Exit(1)
        record = Path(state.result())
        typer.echo(f"outputs: {record.parent}")
        for f in sorted(record.parent.iterdir()):
            if f.suffix in (".tif", ".png", ".csv", ".json", ".zarr"):
                typer.echo(f"  {f.name}")
        typer.echo(f"quicklooks: {record.parent / 'quicklooks'}")
        typer.echo(_ui_hint(run_id))
