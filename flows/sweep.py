"""``sweep_archive``: process every archived scene that has no completed run yet.

Scenes come from an archive root scanned with the glob patterns of ``deploy/sensors.yaml`` (or
given patterns), or from a list file (one path per line, ``#`` comments). A scene is *pending*
when no complete run with the same input sha256, configuration hash and weights sha256s exists
under ``out_root`` (:func:`pipeline.provenance.find_completed_run`), so a second sweep with
nothing new does nothing. Pending scenes run as ``process_scene`` subflows, at most
``max_concurrent`` at a time, on one Dask cluster opened for the whole sweep; a failing scene is
recorded with its reason and the others go on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.settings import SENSORS_FILE, ClusterOptions, RunOptions, SweepParams
from pipeline.errors import ConfigError, HyperdeqError, ReadError


# ------------------------------------------------------------------------------------- scanning
def load_sensors(path: str | Path = SENSORS_FILE) -> dict[str, dict[str, Any]]:
    """The sensor presets (name -> {patterns, format, description})."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read sensor presets {str(path)!r}: {exc}; fix or restore the file") from exc
    sensors = (data or {}).get("sensors")
    if not isinstance(sensors, dict) or not sensors:
        raise ConfigError(f"{str(path)!r} has no 'sensors' mapping; see deploy/sensors.yaml for the layout")
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
        raise ReadError(f"archive root {str(root)!r} is not a directory; give the folder that holds the scenes")
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
            raise ReadError(f"{str(p)!r} line {n}: scene {line!r} does not exist; fix or remove the line")
        out.append(q.resolve())
    if not out:
        raise ConfigError(f"scene list {str(p)!r} names no scene; add one path per line")
    return sorted(set(out))


def scene_state(scene: Path, out_root: str | Path, config: Any) -> dict[str, Any]:
    """``{"scene", "pending", "run_dir", "reason"}`` for one scene (hashes the file, reads no pixels)."""
    from pipeline.provenance import find_completed_run
    from workers.run import plan_run

    try:
        plan = plan_run(scene, out_root, config)
    except HyperdeqError as exc:
        return {"scene": str(scene), "pending": False, "run_dir": None, "reason": f"cannot plan: {exc}"}
    run_dir = Path(plan["run_dir"])
    done = find_completed_run(run_dir.parent, plan["input"]["sha256"], plan["config_hash"], plan["weights"])
    return {"scene": str(scene), "pending": done is None, "run_dir": str(done or run_dir),
            "reason": "" if done is None else "complete run exists"}


# ------------------------------------------------------------------------------------- tasks
@task(name="find-scenes", task_run_name="find scenes", cache_policy=NO_CACHE)
def find_scenes_task(params: SweepParams) -> list[str]:
    if params.list_file is not None:
        return [str(p) for p in read_list_file(params.list_file)]
    return [str(p) for p in scan_archive(params.root, params.sensors, params.patterns)]


@task(name="pending-scenes", task_run_name="check {n} scenes for completed runs", cache_policy=NO_CACHE)
def pending_task(scenes: list[str], out_root: str, config: Any, n: int) -> list[dict[str, Any]]:
    return [scene_state(Path(s), out_root, config) for s in scenes]


@task(name="scene", task_run_name="scene {name}", cache_policy=NO_CACHE)
def scene_task(scene: str, out_root: str, options: RunOptions, cluster: ClusterOptions, name: str) -> str:
    """Run ``process_scene`` as a subflow (its own flow run page, artifacts and state)."""
    from flows.scene_flow import process_scene

    return process_scene(scene=scene, out_dir=out_root, options=options, cluster=cluster)


# ------------------------------------------------------------------------------------- flow
@flow(name="sweep-archive", description="Process every archived scene without a completed run.",
      validate_parameters=True, log_prints=True)
def sweep_archive(
    root: str | None = None,
    list_file: str | None = None,
    out_root: str = "hyperdeq-out",
    sensors: list[str] | None = None,
    patterns: list[str] | None = None,
    max_concurrent: int = 2,
    options: RunOptions = RunOptions(),
    cluster: ClusterOptions = ClusterOptions(),
) -> dict[str, Any]:
    """Returns ``{"processed": [...], "skipped": [...], "failed": [{"scene", "reason"}]}``."""
    log = get_run_logger()
    params = SweepParams(root=root, list_file=list_file, out_root=out_root, sensors=sensors,
                         patterns=patterns, max_concurrent=max_concurrent, options=options,
                         cluster=cluster)
    cfg = params.options.to_run_config(params.out_root, params.cluster)
    scenes = find_scenes_task(params)
    states = pending_task(scenes, params.out_root, cfg, n=len(scenes))
    pending = [s for s in states if s["pending"]]
    summary: dict[str, Any] = {
        "processed": [],
        "skipped": [s["scene"] for s in states if not s["pending"] and s["run_dir"]],
        "failed": [{"scene": s["scene"], "reason": s["reason"]} for s in states
                   if not s["pending"] and not s["run_dir"]],
    }
    log.info("%d scenes found, %d pending, %d already complete, %d unplannable", len(states),
             len(pending), len(summary["skipped"]), len(summary["failed"]))
    if pending:
        _run_pending(pending, params, summary, log)
    from flows.artifacts import publish_sweep_table

    rows = ([{"scene": Path(s).name, "status": "processed", "detail": ""} for s in summary["processed"]]
            + [{"scene": Path(s).name, "status": "skipped", "detail": "complete run exists"}
               for s in summary["skipped"]]
            + [{"scene": Path(f["scene"]).name, "status": "failed", "detail": f["reason"][:500]}
               for f in summary["failed"]])
    if rows:
        publish_sweep_table(rows)
    for f in summary["failed"]:
        log.error("scene %s failed: %s", f["scene"], f["reason"])
    return summary


def _run_pending(pending: list[dict[str, Any]], params: SweepParams, summary: dict[str, Any],
                 log: Any) -> None:
    """Run the pending scenes, ``max_concurrent`` at a time, on one cluster for the whole sweep."""
    from flows.scene_flow import open_cluster

    cluster = params.cluster
    handle = None
    if cluster.kind != "address":
        handle = open_cluster(cluster, params.options.to_run_config(params.out_root, cluster))
        cluster = ClusterOptions(kind="address", address=handle.client.scheduler.address)
        log.info("sweep cluster: %s", handle.describe())
    try:
        queue = list(pending)
        running: list[tuple[str, Any]] = []
        while queue or running:
            while queue and len(running) < params.max_concurrent:
                s = queue.pop(0)
                fut = scene_task.submit(s["scene"], params.out_root, params.options, cluster,
                                        name=Path(s["scene"]).name)
                running.append((s["scene"], fut))
            still = []
            for scene, fut in running:
                if fut.state.is_final():
                    state = fut.state
                    if state.is_completed():
                        summary["processed"].append(scene)
                    else:
                        try:
                            fut.result()
                            reason = state.message or state.name
                        except Exception as exc:  # the subflow's own error, with its message
                            reason = f"{type(exc).__name__}: {exc}"
                        summary["failed"].append({"scene": scene, "reason": reason})
                else:
                    still.append((scene, fut))
            running = still
            if running:
                time.sleep(0.5)
    finally:
        if handle is not None:
            handle.close()
