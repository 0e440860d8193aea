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

from flows.options import OUT_OPT, SCENE_ARG, add_run_options
from pipeline.errors import ConfigError


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


@add_run_options()
def flow_run(
    scene: Path = SCENE_ARG,
    out: Path = OUT_OPT,
    options: Any = None,
) -> None:
    """Process one scene through the Prefect flow (ingest → denoise → unmix → outputs)."""
    if not scene.exists():
        raise ConfigError(f"scene {str(scene)!r} does not exist; give the path of a scene file")
    _run_flow(scene, out, options, "flow run")


@add_run_options()
def sweep(
    root: Path | None = typer.Argument(None, help="archive root to scan (or use --list-file)"),
    list_file: Path | None = typer.Option(
        None, "--list-file", help="text file, one scene path per line"
    ),
    out: Path = typer.Option(Path("hyperdeq-out"), "--out", help="output root"),
    sensor: list[str] | None = typer.Option(
        None, "--sensor", help="sensor preset(s) from deploy/sensors.yaml"
    ),
    pattern: list[str] | None = typer.Option(
        None, "--pattern", help="glob pattern(s) relative to ROOT"
    ),
    max_concurrent: int = typer.Option(2, help="scenes processed at the same time"),
    options: Any = None,
) -> None:
    """Process every scene under ROOT (or in --list-file) that has no completed run yet."""
    from pydantic import ValidationError

    from flows.options import pretty
    from flows.settings import SweepParams
    from flows.sweep import read_list_file, scan_archive

    try:
        p = SweepParams(
            root=None if root is None else str(root),
            list_file=None if list_file is None else str(list_file),
            out_root=str(out),
            sensors=sensor or None,
            patterns=pattern or None,
            max_concurrent=max_concurrent,
            options=options,
        )
    except ValidationError as exc:
        raise ConfigError(pretty(exc)) from None
    # refuse a bad scene source before any server or cluster starts
    if p.list_file is not None:
        read_list_file(p.list_file)
    else:
        scan_archive(str(p.root), p.sensors, p.patterns)
    from flows.options import options_to_build
    from flows.sweep import sweep_archive

    _job, spec = options_to_build(p.options, p.out_root)
    spec.check_reachable()
    with _prefect_defaults():
        state = sweep_archive(
            **p.model_dump(exclude={"options"}), options=p.options, return_state=True
        )
    try:
        s = state.result(raise_on_failure=False)
    except Exception:
        s = None
    if isinstance(s, dict):
        typer.echo(
            f"processed {len(s['processed'])}, skipped {len(s['skipped'])} (already complete), "
            f"failed {len(s['failed'])}"
        )
        for f in s["failed"]:
            typer.echo(f"  failed: {f['scene']}: {f['reason']}")
    if not state.is_completed():
        typer.secho(f"sweep failed: {state.message}", fg=typer.colors.RED, err=True)
        typer.echo(_ui_hint(state.state_details.flow_run_id))
        raise typer.Exit(1)
    typer.echo(_ui_hint(state.state_details.flow_run_id))


@add_run_options(exclude=("cluster", "scheduler"))
def serve(
    sweep_root: Path | None = typer.Option(
        None,
        help="archive root for the scheduled sweep (must exist); default: $HYPERDEQ_SWEEP_ROOT",
    ),
    sweep_out: Path | None = typer.Option(
        None,
        help="output root of both deployments (absolute); default: "
        "$HYPERDEQ_OUT or ./hyperdeq-out resolved now",
    ),
    cron: str = typer.Option("0 2 * * *", help="sweep schedule (cron, UTC); needs --sweep-root"),
    limit: int = typer.Option(2, help="flow runs executed at the same time by this process"),
    options: Any = None,
) -> None:
    """Serve the deployments ``process-scene/served-on-demand`` and ``sweep-archive/served-nightly-sweep``
    from this process (distinct from deploy/prefect.yaml's work-pool deployments; docs/prefect.md)."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL

    from flows.scene_flow import process_scene
    from flows.sweep import sweep_archive

    root = sweep_root or (
        Path(os.environ["HYPERDEQ_SWEEP_ROOT"]) if os.environ.get("HYPERDEQ_SWEEP_ROOT") else None
    )
    if root is not None and not root.expanduser().is_dir():
        raise ConfigError(
            f"sweep root {str(root)!r} is not an existing folder; the nightly sweep would fail "
            "there: give the archive folder with --sweep-root (or $HYPERDEQ_SWEEP_ROOT)"
        )
    out = (sweep_out or Path(os.environ.get("HYPERDEQ_OUT", "hyperdeq-out"))).expanduser().resolve()
    if not PREFECT_API_URL.value():
        typer.secho(
            "warning: PREFECT_API_URL is not set; serving against a temporary server that no one "
            "else can reach. Start `prefect server start` and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api first.",
            fg=typer.colors.YELLOW,
            err=True,
        )
    opts = options.model_dump()
    deployments = [
        process_scene.to_deployment(
            name="served-on-demand",
            tags=["hyperdeq", "scene", "served"],
            parameters={"out_dir": str(out), "options": opts},
            description="Denoise and unmix one scene: give `scene`; outputs under `out_dir`.",
        )
    ]
    kw: dict[str, Any] = {
        "name": "served-nightly-sweep",
        "tags": ["hyperdeq", "sweep", "served"],
        "parameters": {"out_root": str(out), "options": opts},
    }
    if root is not None:
        kw.update(
            cron=cron, parameters={**kw["parameters"], "root": str(root.expanduser().resolve())}
        )
    deployments.append(sweep_archive.to_deployment(**kw))
    typer.echo(
        "serving process-scene/served-on-demand and sweep-archive/served-nightly-sweep "
        f"(outputs under {out}); Ctrl-C to stop"
    )
    prefect_serve(*deployments, limit=limit)


@add_run_options(defaults={"tile": 64, "workers": 1})
def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", help="where the outputs go"),
    full: bool = typer.Option(
        False,
        "--full",
        help="the whole 192×160 px mosaic instead of the 96×96 px window (about 3× the work)",
    ),
    options: Any = None,
) -> None:
    """Run the full flow on the bundled EnMAP Potsdam demo scene and say where to look.

    By default a 96 × 96 px window of the real EnMAP mosaic (written, georeferenced, to
    OUT/input/) goes through ingest, tiling, DECSC denoising, DEQ-Unmix unmixing, blending
    and the georeferenced writers: a few minutes on a 2-core CPU. ``--full`` takes the mosaic.
    """
    from flows.settings import DEMO_WINDOW, demo_scene
    from pipeline.readers.geotiff import crop_geotiff

    scene = demo_scene()
    workers = int(options.workers or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(workers, 1))))
    if options.denoise and not _decsc_available():
        typer.secho(
            "warning: the DECSC weights are not installed (workers/weights/decsc.safetensors); "
            "the demo runs unmixing only.",
            fg=typer.colors.YELLOW,
            err=True,
        )
        options = options.model_copy(update={"denoise": False})
    scene_path = scene
    if not full:
        r0, r1, c0, c1 = DEMO_WINDOW
        scene_path = crop_geotiff(
            scene, out / "input" / f"enmap_potsdam_demo_{r1 - r0}x{c1 - c0}.tif", DEMO_WINDOW
        )
    typer.echo(f"hyperdeq demo: {scene_path.name} -> {out.resolve()}")
    record = _run_flow(scene_path, out, options, "demo")
    typer.echo(f"outputs: {record.parent}")
    for f in sorted(record.parent.iterdir()):
        if f.suffix in (".tif", ".png", ".csv", ".json", ".zarr"):
            typer.echo(f"  {f.name}")
    typer.echo(f"quicklooks: {record.parent / 'quicklooks'}")


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Add ``flow run`` (to the ``flow`` group) and ``sweep``, ``serve``, ``demo`` (top level)."""
    groups["flow"].command("run")(flow_run)
    app.command("sweep")(sweep)
    app.command("serve")(serve)
    app.command("demo")(demo)


def _run_flow(scene: Path, out: Path, options: Any, what: str) -> Path:
    """Run ``process_scene`` in this process; refuse bad input before Prefect or a cluster starts."""
    from flows.options import options_to_build
    from flows.scene_flow import process_scene
    from workers.run import preflight

    job, spec = options_to_build(options, out)
    preflight(
        scene, job
    )  # header, options against the scene, output folder, device, memory: all first
    spec.check_reachable()
    with _prefect_defaults():
        state = process_scene(
            scene=str(scene), out_dir=str(out), options=options, return_state=True
        )
    run_id = state.state_details.flow_run_id
    if state.is_cancelled():  # run.json says 'cancelled'; the same command resumes
        typer.secho(f"{what} cancelled: {state.message}", fg=typer.colors.YELLOW, err=True)
        typer.echo(_ui_hint(run_id))
        raise typer.Exit(130)
    if not state.is_completed():
        typer.secho(f"{what} failed: {state.message}", fg=typer.colors.RED, err=True)
        typer.echo(_ui_hint(run_id))
        raise typer.Exit(1)
    record = Path(state.result())
    typer.echo(f"run record: {record}")
    typer.echo(_ui_hint(run_id))
    return record
