"""The flows against a real Prefect server on loopback (issue 23): a sweep with a failed scene ends
Failed and still carries its table; an in-process flow run cancelled on the server stops and its
record says ``cancelled``; flow runs are named ``<scene stem> · <run id>`` and tagged;
``hyperdeq serve`` refuses a missing sweep root before serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.flows.conftest import crop_geotiff, decsc_installed
from tests.flows.prefect_server import background, prefect_server

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(int(os.environ.get("HYPERDEQ_INTEGRATION_TIMEOUT", "420"))),
]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MOSAIC = ROOT / "tests" / "data" / "demo" / "enmap_potsdam_mosaic_18tiles.tif"
CLIENT_KEYS = ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_API_DATABASE_CONNECTION_URL")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str], Path]]:
    d = tmp_path_factory.mktemp("prefect-runs")
    with prefect_server(d / "home", d / "server.log") as (api_url, env):
        yield api_url, env, d


@pytest.fixture
def client_env(server, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """This process reports to the test server (in-process flow runs and client calls)."""
    api_url, env, _d = server
    for k in CLIENT_KEYS:
        monkeypatch.setenv(k, env[k])
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url, PREFECT_HOME: env["PREFECT_HOME"]}):
        yield env


def _flow_runs(flow_name: str | None = None, tag: str | None = None) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterTags,
    )

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])) if flow_name else None,
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])) if tag else None,
        )


def test_sweep_with_a_failed_scene_ends_failed_with_its_table(
    client_env, tmp_path: Path, test_data: Path
) -> None:
    """Issue 23 item 2: the sweep's state is Failed (alerts fire), the good scene is processed and
    the table (processed / failed with the reason) is the state's data; item 7: the scene's flow
    run is renamed ``<scene stem> · <run id>`` and tagged."""
    from flows.options import RunOptions
    from flows.sweep import sweep_archive

    tile = test_data / "enmap_potsdam_tile" / "enmap_potsdam_tile_128_0.tif"
    good = crop_geotiff(tile, tmp_path / "enmap_good.tif", 0, 0, 16)
    bad = tmp_path / "enmap_corrupt.tif"
    bad.write_bytes(good.read_bytes()[:4096])  # a truncated real file
    lst = tmp_path / "scenes.txt"
    lst.write_text("enmap_good.tif\nenmap_corrupt.tif  # cut off during the copy\n")
    out = tmp_path / "out"
    # unmixing only with a short fit: the sweep's behaviour is under test, not the models
    opts = RunOptions(denoise=False, endmembers=3, unmix_epochs=3, workers=1)

    state = sweep_archive(list_file=str(lst), out_root=str(out), options=opts, return_state=True)
    assert not state.is_completed() and state.is_failed(), state
    assert "1 of 2 scenes failed" in state.message and "enmap_corrupt.tif" in state.message, (
        state.message
    )
    table = state.result(raise_on_failure=False)
    assert [Path(p).name for p in table["processed"]] == ["enmap_good.tif"], table
    assert table["skipped"] == []
    (failed,) = table["failed"]
    assert (
        Path(failed["scene"]).name == "enmap_corrupt.tif"
        and "corrupt or truncated" in failed["reason"]
    ), failed

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        sweep_run = client.read_flow_run(state.state_details.flow_run_id)
    assert sweep_run.state.type.value == "FAILED"  # what the server (and its alerts) sees
    (rec,) = out.glob("enmap_good/*/run.json")
    record = json.loads(rec.read_text())
    assert record["status"] == "complete" and record["outputs"]
    assert not list(out.glob("enmap_corrupt/*/run.json"))

    (scene_run,) = _flow_runs("process-scene", tag="scene:enmap_good")
    assert scene_run.name == f"enmap_good · {record['run_id']}", scene_run.name
    assert {"hyperdeq", "scene:enmap_good", "model:deq-unmix"} <= set(scene_run.tags), (
        scene_run.tags
    )
    assert "model:decsc" not in scene_run.tags  # tags name the models that ran
    assert scene_run.parent_task_run_id is not None  # a subflow of the sweep
    assert scene_run.state.type.value == "COMPLETED"


@pytest.mark.timeout(300)
def test_cancelling_an_in_process_flow_run_stops_it(client_env, tmp_path: Path) -> None:
    """Issue 23 item 1: ``hyperdeq flow run`` (the flow in its own process, no deployment) sees its
    flow run set to Cancelling on the server within seconds, stops the run (exit 130) and leaves
    run.json ``cancelled``; the flow run ends Cancelled. Item 7: the run is named and tagged."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    out = tmp_path / "out"
    # the whole demo mosaic in 32 px tiles on one worker: minutes of model work, so still running
    models = ["--no-unmix"] if decsc_installed() else ["--no-denoise"]
    cmd = [
        str(BIN / "hyperdeq"),
        "flow",
        "run",
        str(MOSAIC),
        "--tile",
        "32",
        "--workers",
        "1",
        "--out",
        str(out),
        *models,
    ]
    log = tmp_path / "flow-run.log"
    with background(cmd, client_env, log, cwd=ROOT) as proc:
        deadline = time.monotonic() + 180
        rec = None
        while rec is None:  # tiles cut: the model stage is next (or under way)
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            found = [
                r
                for r in out.glob("*/*/run.json")
                if (r.parent / "_stages" / "tile_input.json").is_file()
            ]
            if found and json.loads(found[0].read_text())["status"] == "running":
                rec = found[0]
            time.sleep(0.5)
        run_id = json.loads(rec.read_text())["run_id"]
        (fr,) = _flow_runs("process-scene", tag="scene:enmap_potsdam_mosaic_18tiles")
        assert fr.name == f"enmap_potsdam_mosaic_18tiles · {run_id}", fr.name
        assert "hyperdeq" in fr.tags
        assert fr.state.type.value == "RUNNING"
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(
                fr.id, Cancelling(message="cancelled by the test"), force=True
            )
        t0 = time.monotonic()
        try:
            rc = proc.wait(
                timeout=30
            )  # the watch polls every 3 s; the stage stops at its next poll
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 30 s after the cancellation\n{log.read_text()[-3000:]}")
        took = time.monotonic() - t0
    text = log.read_text()
    assert rc == 130, text[-3000:]
    record = json.loads(rec.read_text())
    assert record["status"] == "cancelled", record
    assert "RunCancelled" in record["error"] and record["outputs"] == {}
    assert (
        not (rec.parent / "denoised.tif").exists() and not (rec.parent / "abundances.tif").exists()
    )
    assert not (
        rec.parent / ".hyperdeq.lock"
    ).exists()  # the next run of this folder is not refused
    with get_client(sync_client=True) as client:
        final = client.read_flow_run(fr.id).state
    assert final.type.value == "CANCELLED", final
    assert "flow run cancelled: " in text and "flow run failed" not in text, text[-2000:]
    print(f"stopped {took:.1f} s after the cancellation")


def test_serve_refuses_a_missing_sweep_root_before_serving(server, tmp_path: Path) -> None:
    """Issue 23 item 8: exit 2 with a clear message, and nothing served (no deployment created)."""
    _api_url, env, _d = server
    r = subprocess.run(
        [str(BIN / "hyperdeq"), "serve", "--sweep-root", str(tmp_path / "missing")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "is not an existing folder" in r.stderr and "--sweep-root" in r.stderr, r.stderr[-2000:]
    assert "serving" not in r.stdout

    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def _deployments() -> list:
        async with get_client() as client:
            return await client.read_deployments()

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        assert asyncio.run(_deployments()) == []
