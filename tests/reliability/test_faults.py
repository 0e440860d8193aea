"""Faults survived: a worker, the whole run, a tile chunk, the output disk and the scheduler.

Every test runs the real tile pipeline (:func:`workers.run.run_scene`) on a real crop of the
EnMAP Potsdam demo scene, on real multi-process Dask clusters on loopback (a ``LocalCluster`` of
worker processes, or ``dask scheduler`` + ``dask worker`` subprocesses), and compares the outputs
byte for byte with an undisturbed run.
"""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import provenance as prov
from pipeline import tiles as tstore
from tests.reliability._helpers import (
    PY,
    InstrumentedModel,
    LoopbackCluster,
    executions,
    fault_job,
    inner_model,
    kill_tree,
    n_records,
    output_digests,
    run_dirs,
    run_sync,
    session_alive,
    spawn,
    wait_for,
)
from workers.run import OUT_NAMES, RunPlan, run_scene
from workers.stages import StageEnv

N_TILES = 16  # 64x64 crop, tile 16


def _model(log: Path, **kw: float) -> InstrumentedModel:
    log.mkdir(parents=True, exist_ok=True)
    return InstrumentedModel(inner_model("identity"), str(log), **kw)


@pytest.fixture(scope="module")
def reference(demo_crop: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Digests of an undisturbed run (in-process threads) of the crop."""
    tmp = tmp_path_factory.mktemp("ref")
    with ThreadPoolExecutor(2) as ex:
        res = run_scene(
            demo_crop, fault_job(tmp / "out"), ex, tile_models={"denoise": _model(tmp / "log")}
        )
    assert res.status == "complete" and res.n_tiles == N_TILES
    return output_digests(res.run_dir)


def _ok_verified(run_dir: Path) -> set[str]:
    """Tile keys whose record says ok and whose stored bytes still match the recorded sha256."""
    dest = run_dir / "tiles" / "denoise.zarr"
    if not dest.exists():
        return set()
    grid = tstore.open_grid(run_dir / "tiles" / "input.zarr")
    recs = tstore.load_records(dest)
    return {
        t.key
        for t in grid.tiles
        if recs.get(t.key, {}).get("status") == "ok"
        and tstore.verify_tile(dest, grid, t, recs[t.key].get("checksum"))
    }


def _no_complete_outputs(run_dir: Path) -> None:
    """Nothing in a failed/killed run may look complete: no final-named output at all (outputs are
    staged under ``_staging/`` until the run completes), and no record listing outputs."""
    assert not prov.is_complete(run_dir)
    z = run_dir / "denoised.zarr"
    if z.exists():
        assert not zarr.open_group(str(z), mode="r").attrs.get("hyperdeq_complete")
    assert not (run_dir / "denoised.tif").exists()
    assert not [n for n in OUT_NAMES.values() if (run_dir / n).exists()]
    if (run_dir / "run.json").is_file():
        assert not json.loads((run_dir / "run.json").read_text()).get("outputs")


def _stage(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())["stages"]["denoise"]


# ------------------------------------------------------------------------------- worker killed
@pytest.mark.integration
def test_worker_killed_mid_run(
    case, demo_crop: Path, reference: dict[str, str], tmp_path: Path
) -> None:
    case(
        "fault",
        "a Dask worker process SIGKILLed mid-run (LocalCluster, 2 worker processes; the 5th tile "
        "execution kills its own worker)",
        "run completes; every tile exactly once in the outputs; outputs byte-identical to an undisturbed run",
    )
    from distributed import Client, LocalCluster

    log = tmp_path / "log"
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit="2GiB",
        ) as cluster,
        Client(cluster) as client,
    ):
        worker_pids = set(client.run(os.getpid).values())
        res = run_scene(
            demo_crop,
            fault_job(tmp_path / "out"),
            client,
            tile_models={"denoise": _model(log, delay_s=0.05, kill_at=5)},
        )
        pids_after = set(client.run(os.getpid).values())
    killed = int((log / "killed.marker").read_text())
    assert killed in worker_pids and killed != os.getpid()  # a worker, not this process, died
    assert killed not in pids_after  # the nanny replaced it
    assert res.status == "complete" and not res.failed_tiles
    recs = tstore.load_records(res.run_dir / "tiles" / "denoise.zarr")
    assert len(recs) == N_TILES and all(r["status"] == "ok" for r in recs.values())
    assert _ok_verified(res.run_dir) == set(recs)
    runs = executions(log, res.run_dir / "tiles" / "input.zarr")
    assert set(runs) == set(recs)  # no tile lost
    assert output_digests(res.run_dir) == reference
    case.measure(
        killed_worker_pid=killed,
        tile_executions=sum(runs.values()),
        tiles_rerun=sorted(k for k, v in runs.items() if v > 1),
        outputs_identical=True,
    )


# ------------------------------------------------------------------------------- whole run killed
def _driver(scene: Path, out: Path, log: Path, *extra: str) -> list[str]:
    log.mkdir(parents=True, exist_ok=True)
    return [
        PY,
        "-m",
        "tests.reliability._driver",
        str(scene),
        str(out),
        "--log-dir",
        str(log),
        *extra,
    ]


@pytest.mark.integration
def test_whole_run_killed_and_resumed(
    case, demo_crop: Path, reference: dict[str, str], tmp_path: Path
) -> None:
    case(
        "fault",
        "the whole run (driver + LocalCluster of 2 worker processes) SIGKILLed after some tiles "
        "are recorded; then rerun",
        "no output looks complete; the rerun recomputes only the unfinished tiles (run record) and "
        "its outputs are byte-identical",
    )
    out = tmp_path / "out"
    proc = spawn(
        _driver(demo_crop, out, tmp_path / "log1", "--workers", "2", "--delay", "0.4"),
        tmp_path / "run1.log",
    )
    try:
        wait_for(lambda: n_records(out) >= 4, 240, "4 tile records")
    finally:
        kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL
    wait_for(lambda: not session_alive(proc.pid), 30, "the killed run's processes to go")
    (run_dir,) = run_dirs(out)
    assert prov.load_run_record(run_dir)["status"] == "running"
    _no_complete_outputs(run_dir)
    done_before = _ok_verified(run_dir)
    assert 0 < len(done_before) < N_TILES

    r = run_sync(_driver(demo_crop, out, tmp_path / "log2", "--workers", "2"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["status"] == "complete"
    stage = _stage(run_dir)
    assert stage["n_reused"] == len(done_before)
    rerun = executions(tmp_path / "log2", run_dir / "tiles" / "input.zarr")
    assert (
        set(rerun)
        == {t.key for t in tstore.open_grid(run_dir / "tiles" / "input.zarr").tiles} - done_before
    )
    assert all(v == 1 for v in rerun.values())
    assert output_digests(run_dir) == reference
    case.measure(
        tiles_done_before_kill=len(done_before),
        reused_on_rerun=stage["n_reused"],
        recomputed_on_rerun=len(rerun),
        outputs_identical=True,
    )


# ------------------------------------------------------------------------------- corrupted chunk
def _chunk_file(dest: Path, pos: int) -> Path:
    files = list((dest / "data").glob(f"c/{pos}/**/*"))
    files = [f for f in files if f.is_file()]
    assert len(files) == 1, files
    return files[0]


def _env(ex: ThreadPoolExecutor, model: InstrumentedModel) -> StageEnv:
    return StageEnv(model_executor=ex, executor=ex, n_workers=2, tile_models={"denoise": model})


def _partial_run(scene: Path, out: Path, log: Path) -> tuple[Path, RunPlan]:
    """Ingest, tile and denoise only (a run interrupted before blending)."""
    from workers.run import plan_run
    from workers.stages import stage_ingest, stage_model, stage_tile

    model = _model(log)
    plan = plan_run(scene, fault_job(out), tile_models={"denoise": model})
    run_dir = plan.run_dir
    run_dir.mkdir(parents=True)
    ts = stage_tile(plan, stage_ingest(plan), "input")
    with ThreadPoolExecutor(2) as ex:
        stage_model(plan, "denoise", ts, _env(ex, model))
    return run_dir, plan


def _corrupt(dest: Path, key: str, how: str) -> None:
    grid = tstore.open_grid(dest)
    tile = next(t for t in grid.tiles if t.key == key)
    f = _chunk_file(dest, grid.position(tile))
    data = f.read_bytes()
    if how == "truncated":
        f.write_bytes(data[: len(data) // 2])
    elif how == "bytes-flipped":
        mid = len(data) // 2
        f.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) + data[mid + 64 :])
    else:  # "valid-but-wrong": decodes fine, different numbers (silent bit rot)
        arr = zarr.open_array(str(dest / "data"), mode="r+")
        block = np.asarray(arr[grid.position(tile)])
        arr[grid.position(tile)] = np.where(np.isfinite(block), block * np.float32(1.001), block)


@pytest.mark.parametrize("how", ["truncated", "bytes-flipped", "valid-but-wrong"])
def test_corrupted_tile_chunk_recomputed(
    case, how: str, demo_crop: Path, reference: dict[str, str], tmp_path: Path
) -> None:
    case(
        "fault",
        f"a tile-output chunk {how} on disk after it was written (run interrupted before blending)",
        "detected by the sha256 in the tile record; only that tile recomputed on the next run; "
        "outputs byte-identical",
    )
    run_dir, _ = _partial_run(demo_crop, tmp_path / "out", tmp_path / "log1")
    dest = run_dir / "tiles" / "denoise.zarr"
    key = sorted(tstore.load_records(dest))[5]
    _corrupt(dest, key, how)
    assert _ok_verified(run_dir) == set(tstore.load_records(dest)) - {key}
    with ThreadPoolExecutor(2) as ex:
        res = run_scene(
            demo_crop,
            fault_job(tmp_path / "out"),
            ex,
            tile_models={"denoise": _model(tmp_path / "log2")},
        )
    assert res.status == "complete"
    assert executions(tmp_path / "log2", run_dir / "tiles" / "input.zarr") == {key: 1}
    assert _stage(run_dir)["n_reused"] == N_TILES - 1
    assert output_digests(res.run_dir) == reference
    case.measure(corrupted_tile=key, recomputed=1, reused=N_TILES - 1, outputs_identical=True)


def test_blend_refuses_tile_that_rotted_after_denoise(
    case, demo_crop: Path, tmp_path: Path
) -> None:
    case(
        "fault",
        "a tile-output chunk silently altered (still decodes) between the denoise stage and blending",
        "blending refuses it (ProvenanceError naming the tile), never blends it silently",
    )
    from pipeline.errors import HyperdeqError, ProvenanceError
    from workers.stages import stage_blend

    run_dir, plan = _partial_run(demo_crop, tmp_path / "out", tmp_path / "log")
    dest = run_dir / "tiles" / "denoise.zarr"
    key = sorted(tstore.load_records(dest))[5]
    _corrupt(dest, key, "valid-but-wrong")
    with ThreadPoolExecutor(2) as ex, pytest.raises(HyperdeqError, match=key) as info:
        stage_blend(plan, "denoise", _env(ex, _model(tmp_path / "log")))
    assert info.type is ProvenanceError
    _no_complete_outputs(run_dir)
    case.measure(refused_tile=key, error=f"{info.type.__name__}: {info.value}"[:200])


# ------------------------------------------------------------------------------- disk full
def _limit_fsize(pgid: int, nbytes: int) -> int:
    """Set RLIMIT_FSIZE on every process of the session ``pgid`` (a full disk for each of them)."""
    import psutil

    n = 0
    for pid in session_alive(pgid):
        try:
            psutil.Process(pid).rlimit(psutil.RLIMIT_FSIZE, (nbytes, nbytes))
            n += 1
        except psutil.Error:
            pass
    return n


@pytest.mark.integration
@pytest.mark.slow
def test_output_disk_full_partway(
    case, demo_crop: Path, reference: dict[str, str], tmp_path: Path
) -> None:
    case(
        "fault",
        "output disk full partway: RLIMIT_FSIZE=4 KiB set on the driver and every worker process "
        "after 4 tiles (writes fail with EFBIG; Python ignores SIGXFSZ)",
        "a clear error (exit 2, names the write that failed), run.json status 'failed', no output that "
        "looks complete; a rerun with space completes byte-identical",
    )
    out = tmp_path / "out"
    proc = spawn(
        _driver(demo_crop, out, tmp_path / "log1", "--workers", "2", "--delay", "0.4"),
        tmp_path / "run1.log",
    )
    try:
        wait_for(lambda: n_records(out) >= 4, 240, "4 tile records")
        n_limited = _limit_fsize(proc.pid, 4096)
        proc.wait(timeout=300)
    finally:
        kill_tree(proc)
    msg = (tmp_path / "run1.log").read_text()
    assert proc.returncode == 2, msg[-3000:]
    err = [ln for ln in msg.splitlines() if ln.startswith("error:")]
    assert err and ("too large" in err[-1].lower() or "space" in err[-1].lower()), msg[-3000:]
    (run_dir,) = run_dirs(out)
    _no_complete_outputs(run_dir)
    status = prov.load_run_record(run_dir)["status"]
    case.measure(processes_limited=n_limited, error=err[-1][:160], run_status=status)
    r = run_sync(_driver(demo_crop, out, tmp_path / "log2", "--workers", "2"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert output_digests(run_dirs(out)[0]) == reference
    case.measure(outputs_identical=True)
    assert status == "failed", f"run.json says {status!r} after the failure"


# ------------------------------------------------------------------------------- scheduler lost
@pytest.mark.integration
@pytest.mark.slow
def test_scheduler_lost_mid_run(
    case, demo_crop: Path, reference: dict[str, str], tmp_path: Path
) -> None:
    case(
        "fault",
        "the Dask scheduler process (dask scheduler + 2 dask worker subprocesses) SIGKILLed mid-run",
        "the run fails in bounded time with a clear message naming the scheduler; nothing looks "
        "complete; a rerun on a new cluster resumes (finished tiles reused) byte-identical",
    )
    out = tmp_path / "out"
    c1 = LoopbackCluster(tmp_path / "c1")
    try:
        c1.wait_ready()
        proc = spawn(
            _driver(demo_crop, out, tmp_path / "log1", "--scheduler", c1.address, "--delay", "0.4"),
            tmp_path / "run1.log",
        )
        try:
            wait_for(lambda: n_records(out) >= 3, 240, "3 tile records")
            kill_tree(c1.scheduler)
            proc.wait(timeout=240)
        finally:
            kill_tree(proc)
    finally:
        c1.close()
    msg = (tmp_path / "run1.log").read_text()
    assert proc.returncode not in (0, None), msg[-3000:]
    (run_dir,) = run_dirs(out)
    _no_complete_outputs(run_dir)
    done_before = _ok_verified(run_dir)
    err = [ln for ln in msg.splitlines() if ln.startswith("error:")]
    case.measure(
        exit_code=proc.returncode,
        error=(err[-1] if err else msg.strip().splitlines()[-1])[:200],
        tiles_done_before=len(done_before),
    )
    c2 = LoopbackCluster(tmp_path / "c2")
    try:
        c2.wait_ready()
        r = run_sync(_driver(demo_crop, out, tmp_path / "log2", "--scheduler", c2.address))
    finally:
        c2.close()
    assert r.returncode == 0, r.stderr[-2000:]
    assert _stage(run_dir)["n_reused"] >= len(done_before) > 0
    assert output_digests(run_dir) == reference
    case.measure(outputs_identical=True)
    assert err and "scheduler" in err[-1].lower(), msg[-2000:]


# ------------------------------------------------------------------------------- the CLI, killed
@pytest.mark.integration
@pytest.mark.slow
def test_cli_run_killed_and_resumed_decsc(case, tmp_path: Path) -> None:
    case(
        "fault",
        "`hyperdeq run --no-unmix` (real DECSC weights, 32x32x31 crop, 4 tiles, LocalCluster of 1 worker process) SIGKILLed with its "
        "whole process tree after some tiles are recorded; then the same command again",
        "the rerun resumes: only unfinished tiles recomputed (run record), outputs byte-identical to an "
        "uninterrupted CLI run",
    )
    from tests.reliability._helpers import decsc_available

    if not decsc_available():
        pytest.skip("workers/weights/decsc.safetensors is not installed (or fails its checks)")
    from tests.reliability._data import crop_geotiff

    # 32x32 px, 31 bands (one DECSC spectral window): 4 tiles, so three CLI runs stay affordable on CPU
    scene = crop_geotiff(tmp_path / "scene" / "potsdam_31b.tif", size=32, bands=slice(20, 51))
    hyperdeq = str(Path(PY).parent / "hyperdeq")
    args = [
        "run",
        str(scene),
        "--no-unmix",
        "--tile",
        "16",
        "--halo",
        "4",
        "--batch",
        "1",
        "--workers",
        "1",
    ]
    ref = run_sync([hyperdeq, *args, "--out", str(tmp_path / "ref")], timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    (ref_dir,) = run_dirs(tmp_path / "ref")
    want = output_digests(ref_dir)
    out = tmp_path / "out"
    proc = spawn([hyperdeq, *args, "--out", str(out)], tmp_path / "run1.log")
    try:
        wait_for(lambda: n_records(out) >= 2, 400, "2 DECSC tile records")
    finally:
        kill_tree(proc)
    (run_dir,) = run_dirs(out)
    _no_complete_outputs(run_dir)
    done_before = _ok_verified(run_dir)
    n_tiles = len(tstore.open_grid(run_dir / "tiles" / "input.zarr").tiles)
    assert 0 < len(done_before) < n_tiles
    r = run_sync([hyperdeq, *args, "--out", str(out)], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    stage = _stage(run_dir)
    assert stage["n_reused"] == len(done_before)
    assert output_digests(run_dir) == want
    case.measure(
        tiles_done_before_kill=len(done_before),
        reused_on_rerun=stage["n_reused"],
        recomputed_on_rerun=n_tiles - stage["n_reused"],
        outputs_identical=True,
    )


# ------------------------------------------------------------------------------- teardown fails
def test_teardown_errors_after_complete_run_are_warnings(
    case,
    demo_crop: Path,
    reference: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    case(
        "fault",
        "`hyperdeq run --no-unmix` whose Dask client and cluster both raise when closed after the run "
        "completed (issue 21 item 8; in-process cluster, identity model)",
        "exit 0, run complete, each teardown error logged as a warning (hyperdeq.cluster), outputs byte-identical",
    )
    import logging

    from distributed import Client, LocalCluster
    from typer.testing import CliRunner

    import workers.run as wr
    from flows.cli import app
    from workers.cluster import ClusterHandle

    restore: list[tuple[object, object]] = []

    def exploding_open(spec: object, device: str = "cpu", preload: object = None) -> ClusterHandle:
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        )
        client = Client(cluster, set_as_default=False)
        for obj, exc in (
            (client, RuntimeError("client teardown exploded")),
            (cluster, OSError("cluster teardown exploded")),
        ):
            real = obj.close
            restore.append((obj, real))

            def close(*_a: object, _real=real, _exc=exc, **_k: object) -> None:
                _real()
                raise _exc

            obj.close = close  # type: ignore[method-assign]
        return ClusterHandle(client=client, cluster=cluster)

    real_run_scene = wr.run_scene
    model = _model(tmp_path / "log")
    monkeypatch.setattr(wr, "open_cluster", exploding_open)
    monkeypatch.setattr(
        wr,
        "run_scene",
        lambda scene, job, cluster, **kw: real_run_scene(
            scene, job, cluster, tile_models={"denoise": model}, **kw
        ),
    )
    out = tmp_path / "out"
    try:
        with caplog.at_level(logging.WARNING, logger="hyperdeq.cluster"):
            result = CliRunner().invoke(
                app,
                [
                    "run",
                    str(demo_crop),
                    "--out",
                    str(out),
                    "--no-unmix",
                    "--tile",
                    "16",
                    "--halo",
                    "4",
                    "--batch",
                    "1",
                ],
            )
    finally:
        for obj, real in restore:
            obj.close = real  # type: ignore[method-assign]
    assert len(restore) == 2, "the run did not open its cluster through open_cluster"
    assert result.exit_code == 0 and result.exception is None, result.output[-3000:]
    assert ": complete" in result.output
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.name == "hyperdeq.cluster" and r.levelno == logging.WARNING
    ]
    assert any("closing the Dask client raised RuntimeError" in m for m in warned), warned
    assert any("closing the Dask cluster raised OSError" in m for m in warned), warned
    (run_dir,) = run_dirs(out)
    assert prov.load_run_record(run_dir)["status"] == "complete"
    assert output_digests(run_dir) == reference
    case.measure(
        exit_code=result.exit_code,
        warnings=len(warned),
        run_status="complete",
        outputs_identical=True,
    )
