"""A real multi-process Dask cluster on loopback: scheduler + two workers as subprocesses.

One worker carries the ``GPU=1`` resource label; model tasks must land on it, blend tasks may run
anywhere, and every process is gone at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline.test_tiles import write_crop_tif

pytestmark = pytest.mark.integration

DASK = str(Path(sys.executable).with_name("dask"))


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [DASK, *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[2],
    )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[object, dict[str, str]]]:
    from distributed import Client

    sched_file = tmp_path / "scheduler.json"
    procs = [
        _spawn(
            [
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(sched_file),
            ],
            tmp_path / "scheduler.log",
        )
    ]
    client = None
    try:
        deadline = time.monotonic() + 120
        while not sched_file.exists():
            assert procs[0].poll() is None, (tmp_path / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "scheduler did not start"
            time.sleep(0.2)
        common = [
            "--scheduler-file",
            str(sched_file),
            "--nthreads",
            "1",
            "--no-nanny",
            "--no-dashboard",
            "--host",
            "127.0.0.1",
            "--memory-limit",
            "0",
        ]
        procs.append(
            _spawn(
                ["worker", *common, "--name", "gpu-worker", "--resources", "GPU=1"],
                tmp_path / "w_gpu.log",
            )
        )
        procs.append(_spawn(["worker", *common, "--name", "cpu-worker"], tmp_path / "w_cpu.log"))
        client = Client(scheduler_file=str(sched_file), timeout="60s")
        client.wait_for_workers(2, timeout=180)
        workers = client.scheduler_info(n_workers=-1)["workers"]
        names = {w["name"]: addr for addr, w in workers.items()}
        yield client, names
    finally:
        if client is not None:
            client.close()
        _stop(procs)
        leaked = [p.pid for p in procs if _alive(p.pid)]
        assert not leaked, f"processes still alive after shutdown: {leaked}"


def _prepared_run(tmp_path: Path, tile_models: dict | None = None) -> tuple[object, Path]:
    """A denoise-only run planned on a real 48x48 crop, ingested and cut into 16 px tiles."""
    from pipeline.config import RunConfig
    from workers.run import Job, plan_run
    from workers.stages import stage_ingest, stage_tile

    scene = write_crop_tif(tmp_path / "crop.tif", 0, 0, 48, 48)
    job = Job(RunConfig(out_root=tmp_path / "out", tile=16, halo=4, batch_size=2), unmix=None)
    plan = plan_run(scene, job, tile_models=tile_models)
    ingested = stage_ingest(plan)
    return plan, stage_tile(plan, ingested)


def _env(handle, tile_models: dict | None = None):
    from workers.stages import StageEnv

    return StageEnv(
        model_executor=handle.model_executor(),
        executor=handle.executor(),
        n_workers=max(1, handle.n_workers()),
        cluster=handle.describe(),
        client=handle.client,
        tile_models=tile_models or {},
    )


def test_model_tasks_run_on_the_gpu_labelled_worker(
    cluster: tuple[object, dict[str, str]], tmp_path: Path
) -> None:
    from pipeline import tiles as ts
    from workers.cluster import ClusterHandle, has_gpu_workers
    from workers.infer import IdentityTileModel
    from workers.stages import stage_blend, stage_model

    client, names = cluster
    assert has_gpu_workers(client)  # type: ignore[arg-type]
    handle = ClusterHandle(client=client, gpu=True)  # type: ignore[arg-type]
    desc = handle.describe()
    assert desc["n_workers"] == 2 and desc["gpu_workers"] == [names["gpu-worker"]]
    models = {"denoise": IdentityTileModel()}
    plan, tiles = _prepared_run(tmp_path, models)
    env = _env(handle, models)
    summary = stage_model(plan, "denoise", tiles, env)
    assert summary["n_ok"] == summary["n_tiles"] == 9 and not summary["failed"]
    recs = ts.load_records(summary["path"])
    assert {r["worker"] for r in recs.values()} == {names["gpu-worker"]}
    # blending (one task per output chunk) may use both workers and reproduces the input exactly
    out = stage_blend(plan, "denoise", env)
    from pipeline.ingest import open_zarr_scene
    from pipeline.writers import open_output
    from workers.run import INGESTED

    src = open_zarr_scene(plan.run_dir / INGESTED)
    good = src["good_band"].values
    np.testing.assert_array_equal(open_output(out, "denoised").values[good], src.values[good])


@pytest.fixture
def decsc_weights() -> Path:
    """Skip (before starting any process) when the shipped DECSC weights are absent or do not verify."""
    from pipeline.errors import WeightsError
    from workers.registry import get_spec, verified_weights_path

    try:
        return verified_weights_path(get_spec("decsc"))
    except WeightsError as exc:
        pytest.skip(f"DECSC weights not available: {exc}")


def test_real_denoiser_loaded_once_per_worker_by_the_plugin(
    decsc_weights: Path, cluster: tuple[object, dict[str, str]], tmp_path: Path
) -> None:
    from pipeline import tiles as ts
    from workers.cluster import ClusterHandle
    from workers.infer import cached_keys
    from workers.plugin import ModelPlugin
    from workers.stages import stage_model

    client, names = cluster
    plan, tiles = _prepared_run(tmp_path)
    # the plugin the run registers: the models the job's options ask to preload
    client.register_plugin(ModelPlugin(**plan.job.preload()), name=ModelPlugin.name)  # type: ignore[attr-defined]
    loaded = client.run(cached_keys)  # type: ignore[attr-defined]
    assert all(any(k[0] == "decsc" for k in keys) for keys in loaded.values())
    handle = ClusterHandle(client=client, gpu=True)  # type: ignore[arg-type]
    summary = stage_model(
        plan, "denoise", tiles, _env(handle)
    )  # the registry's DECSC (job.denoise)
    assert summary["n_ok"] == 9, json.dumps(summary)[:2000]
    recs = ts.load_records(summary["path"]).values()
    assert {r["worker"] for r in recs} == {names["gpu-worker"]}
    assert all(isinstance(r["iterations"], int) and r["iterations"] > 0 for r in recs)
    after = client.run(cached_keys, workers=[names["gpu-worker"]])  # type: ignore[attr-defined]
    assert (
        sum(k[0] == "decsc" for k in after[names["gpu-worker"]]) == 1
    )  # still one model: never reloaded
