"""``sweep_archive``: process every archived scene that has no completed run yet.

Scenes come from an archive root scanned with the glob patterns of ``deploy/sensors.yaml`` (or
given patterns), or from a list file (one path per line, ``#`` comments). A scene is *pending*
when no complete run with the same input sha256, configuration hash and weights sha256s exists
under ``out_root`` whose outputs verify (:func:`workers.run.find_completed`), so a second sweep with
nothing new does nothing. Pending scenes run as ``process_scene`` subflows, at most
``max_concurrent`` at a time, on one Dask cluster opened for the whole sweep; a failing scene is
recorded with its reason and the others go on, and the sweep then ends Failed with its table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait as wait_futures

from flows.options import RunOptions, options_to_build
from flows.settings import SENSORS_FILE, SweepParams
from pipeline.errors import ConfigError, HyperdeqError, ReadError


# ------------------------------------------------------------------------------------- scanning
def load_sensors(path: str | Path = SENSORS_FILE) -> dict[str, dict[str, Any]]:
    """The sensor presets (name -> {patterns, format, description})."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"cannot read sensor presets {str(path)!r}: {exc}; fix or restore the file"
        ) from exc
    sensors = (data or {}).get("sensors")
    if not isinstance(sensors, dict) or not sensors:
        raise ConfigError(
            f"{str(path)!r} has no 'sensors' mapping; see deploy/sensors.yaml for the layout"
        )
    return sensors


def scan_archive(
    root: str | Path,
    sensors: Sequence[str] | None = None,
    patterns: Sequence[str] | None = None,
    sensors_file: str | Path = SENSORS_FILE,
) -> list[Path]:
    """Scene files under ``root`` matching ``patterns`` (or the presets of ``sensors``; all by default).

    Explicit patterns must each match something; with presets, at least one pattern must.
    Results are sorted and unique.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ReadError(
            f"archive root {str(root)!r} is not a directory; give the folder that holds the scenes"
        )
    if patterns:
        found: set[Path] = set()
        for pat in patterns:
            hits = {p for p in root.glob(pat) if p.is_file()}
            if not hits:
                raise ConfigError(
                    f"pattern {pat!r} matches no file under {str(root)!r}; check the pattern "
                    "(relative to the root, '**/' to recurse) or drop it"
                )
            found |= hits
        return sorted(found)
    presets = load_sensors(sensors_file)
    names = list(sensors) if sensors else list(presets)
    unknown = [n for n in names if n not in presets]
    if unknown:
        raise ConfigError(f"unknown sensor preset(s) {unknown!r}; known: {sorted(presets)!r}")
    pats = [p for n in names for p in presets[n]["patterns"]]
    found = {p for pat in pats for p in root.glob(pat) if p.is_file()}
    if not found:
        raise ConfigError(
            f"no scene under {str(root)!r} matches the patterns of {names!r} ({pats!r}); "
            "pass --pattern for other file names or check the root"
        )
    return sorted(found)


def read_list_file(path: str | Path) -> list[Path]:
    """Scene paths listed in a text file (relative paths are relative to the file)."""
    p = Path(path).expanduser()
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise ReadError(f"cannot read scene list {str(p)!r}: {exc}; check the path") from exc
    out: list[Path] = []
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        q = Path(line).expanduser()
        q = q if q.is_absolute() else p.parent / q
        if not q.exists():
            raise ReadError(
                f"{str(p)!r} line {n}: scene {line!r} does not exist; fix or remove the line"
            )
        out.append(q.resolve())
    if not out:
        raise ConfigError(f"scene list {str(p)!r} names no scene; add one path per line")
    return sorted(set(out))


def scene_state(scene: Path, job: Any) -> dict[str, Any]:
    """``{"scene", "pending", "run_dir", "reason"}`` for one scene (reads its header and hashes it;
    a completed run counts only when its outputs verify)."""
    from workers.run import find_completed, plan_run

    try:
        plan = plan_run(scene, job)
    except HyperdeqError as exc:
        return {
            "scene": str(scene),
            "pending": False,
            "run_dir": None,
            "reason": f"cannot plan: {exc}",
        }
    done = find_completed(plan)
    return {
        "scene": str(scene),
        "pending": done is None,
        "run_dir": str(done or plan.run_dir),
        "reason": "" if done is None else "complete run exists",
    }


# ------------------------------------------------------------------------------------- tasks
@task(name="find-scenes", task_run_name="find scenes", cache_policy=NO_CACHE)
def find_scenes_task(params: SweepParams) -> list[str]:
    if params.list_file is not None:
        return [str(p) for p in read_list_file(params.list_file)]
    return [str(p) for p in scan_archive(params.root, params.sensors, params.patterns)]


@task(
    name="pending-scenes",
    task_run_name="check {n} scenes for completed runs",
    cache_policy=NO_CACHE,
)
def pending_task(scenes: list[str], job: Any, n: int) -> list[dict[str, Any]]:
    return [scene_state(Path(s), job) for s in scenes]


@task(name="scene", task_run_name="scene {name}", cache_policy=NO_CACHE)
def scene_task(scene: str, out_root: str, options: Any, name: str) -> str:
    """Run ``process_scene`` as a subflow (its own flow run page, logs, artifacts and state)."""
    from flows.scene_flow import process_scene

    return process_scene(scene=scene, out_dir=out_root, options=options)


# ------------------------------------------------------------------------------------- flow
def _sweep_name() -> str:
    """``sweep <root or list file> <UTC date and time>`` (the flow run's name in the UI)."""
    import datetime as dt

    from prefect.runtime import flow_run

    p = flow_run.parameters or {}
    src = p.get("root") or p.get("list_file") or "?"
    return f"sweep {Path(str(src)).name or src} {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M}Z"


@flow(
    name="sweep-archive",
    description="Process every archived scene without a completed run.",
    flow_run_name=lambda: _sweep_name(),
    validate_parameters=True,
    log_prints=True,
)
def sweep_archive(
    root: str | None = None,
    list_file: str | None = None,
    out_root: str = "hyperdeq-out",
    sensors: list[str] | None = None,
    patterns: list[str] | None = None,
    max_concurrent: int = 2,
    options: RunOptions = RunOptions(),  # type: ignore[valid-type]
) -> dict[str, Any]:
    """Returns ``{"processed": [...], "skipped": [...], "failed": [{"scene", "reason"}]}``; ends
    Failed (after every other scene ran and the table is published) when a scene failed.

    ``root``: archive folder scanned with the sensor patterns; ``list_file``: a text file with one
    scene path per line (give one of the two); ``out_root``: where runs go; ``sensors``/``patterns``:
    which files under ``root`` are scenes; ``max_concurrent``: scenes at the same time; ``options``:
    the run options of every scene.
    """
    log = get_run_logger()
    params = SweepParams(
        root=root,
        list_file=list_file,
        out_root=out_root,
        sensors=sensors,
        patterns=patterns,
        max_concurrent=max_concurrent,
        options=options,
    )
    job, _cluster = options_to_build(params.options, params.out_root)
    scenes = find_scenes_task(params)
    states = pending_task(scenes, job, n=len(scenes))
    pending = [s for s in states if s["pending"]]
    summary: dict[str, Any] = {
        "processed": [],
        "skipped": [s["scene"] for s in states if not s["pending"] and s["run_dir"]],
        "failed": [
            {"scene": s["scene"], "reason": s["reason"]}
            for s in states
            if not s["pending"] and not s["run_dir"]
        ],
    }
    log.info(
        "%d scenes found, %d pending, %d already complete, %d unplannable",
        len(states),
        len(pending),
        len(summary["skipped"]),
        len(summary["failed"]),
    )
    if pending:
        _run_pending(pending, params, summary, log)
    from flows.artifacts import publish_sweep_table

    rows = (
        [{"scene": Path(s).name, "status": "processed", "detail": ""} for s in summary["processed"]]
        + [
            {"scene": Path(s).name, "status": "skipped", "detail": "complete run exists"}
            for s in summary["skipped"]
        ]
        + [
            {"scene": Path(f["scene"]).name, "status": "failed", "detail": f["reason"][:500]}
            for f in summary["failed"]
        ]
    )
    if rows:
        publish_sweep_table(rows)
    for f in summary["failed"]:
        log.error("scene %s failed: %s", f["scene"], f["reason"])
    if summary["failed"]:  # the sweep ends Failed (alerts fire) and still carries its table
        from prefect.states import Failed

        return Failed(  # type: ignore[return-value]
            message=f"{len(summary['failed'])} of {len(states)} scenes failed "
            f"({', '.join(Path(f['scene']).name for f in summary['failed'][:5])}); processed "
            f"{len(summary['processed'])}, skipped {len(summary['skipped'])}: see the sweep table",
            data=summary,
        )
    return summary


def _run_pending(
    pending: list[dict[str, Any]], params: SweepParams, summary: dict[str, Any], log: Any
) -> None:
    """Run the pending scenes, ``max_concurrent`` at a time, on one cluster for the whole sweep."""
    from workers.cluster import open_cluster

    options = params.options
    job, spec = options_to_build(options, params.out_root)
    handle = None
    if spec.kind != "address":  # one cluster for the whole sweep; each scene connects to it
        handle = open_cluster(spec, job.config.device, job.preload())
        options = options.model_copy(
            update={
                "cluster": "address",
                "scheduler": handle.client.scheduler.address,
                "workers": None,
                "recipe": None,
                "memory_limit": None,
            }
        )
        log.info("sweep cluster: %s", handle.describe())
    try:
        queue = list(pending)
        running: list[tuple[str, Any]] = []
        while queue or running:
            while queue and len(running) < params.max_concurrent:
                s = queue.pop(0)
                fut = scene_task.submit(
                    s["scene"], params.out_root, options, name=Path(s["scene"]).name
                )
                running.append((s["scene"], fut))
            # the futures' own results, not the API's view of their state: that view lags (or never
            # arrives) when the server's event stream is slow, and the loop would wait for ever
            done = wait_futures([f for _, f in running], timeout=0.5).done
            still = []
            for scene, fut in running:
                if fut not in done:
                    still.append((scene, fut))
                    continue
                fut.wait(0)  # records the final state from the future itself
                state = fut.state  # that recorded state, not an API read
                if state.is_completed():
                    summary["processed"].append(scene)
                    continue
                try:
                    fut.result()
                    reason = state.message or state.name
                except Exception as exc:  # the subflow's own error, with its message
                    reason = f"{type(exc).__name__}: {exc}"
                summary["failed"].append({"scene": scene, "reason": reason})
            running = still
    finally:
        if handle is not None:
            handle.close()
