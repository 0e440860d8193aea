"""A real Prefect server on loopback, the deployments served by ``hyperdeq serve``, one
``process_scene`` run triggered through the API on a real EnMAP crop, its artifacts read back.
Also: ``prefect deploy`` accepts ``deploy/prefect.yaml`` from the repository."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.flows.conftest import crop_geotiff, decsc_installed
from tests.flows.prefect_server import background, prefect_server

# the per-scene unmixer fit dominates the run; HYPERDEQ_INTEGRATION_TIMEOUT raises the cap
# on a loaded machine
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(int(os.environ.get("HYPERDEQ_INTEGRATION_TIMEOUT", "420"))),
]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def enmap_tile(test_data: Path) -> Path:
    return test_data / "enmap_potsdam_tile" / "enmap_potsdam_tile_128_0.tif"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str], Path]]:
    d = tmp_path_factory.mktemp("prefect-server")
    with prefect_server(d / "home", d / "server.log") as (api_url, env):
        yield api_url, env, d


async def _wait_deployment(name: str, timeout: float = 180.0) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            try:
                await client.read_deployment_by_name(name)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)


async def _deployment(name: str):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_deployment_by_name(name)


def _assert_options_described(schema: dict) -> None:
    from flows.options import OPTIONS

    defs = schema.get("definitions") or schema.get("$defs") or {}
    props = defs["RunOptions"]["properties"]
    assert set(props) == {o.name for o in OPTIONS}
    missing = [k for k, v in props.items() if not str(v.get("description") or "").strip()]
    assert not missing, missing


async def _flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_run(flow_run_id)


async def _artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def test_served_process_scene_run_through_the_api(
    server, tmp_path: Path, enmap_tile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api_url, env, d = server
    for k in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_API_DATABASE_CONNECTION_URL"):
        monkeypatch.setenv(k, env[k])
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    scene = crop_geotiff(enmap_tile, tmp_path / "enmap_potsdam_crop.tif", 0, 0, 16)
    out = tmp_path / "out"
    with (
        temporary_settings({PREFECT_API_URL: api_url, PREFECT_HOME: env["PREFECT_HOME"]}),
        background(
            [str(BIN / "hyperdeq"), "serve", "--limit", "1"], env, d / "serve.log", cwd=ROOT
        ),
    ):
        # `hyperdeq serve` names its deployments apart from deploy/prefect.yaml's (on-demand, nightly-sweep)
        asyncio.run(_wait_deployment("process-scene/served-on-demand"))
        asyncio.run(_wait_deployment("sweep-archive/served-nightly-sweep"))
        schema = asyncio.run(_deployment("process-scene/served-on-demand")).parameter_openapi_schema
        _assert_options_described(
            schema
        )  # the deployment form: every option has its help (issue 23 item 8)
        params = {
            "scene": str(scene),
            "out_dir": str(out),
            # the cluster is part of the options (no separate `cluster` parameter)
            "options": {
                "denoise": decsc_installed(),
                "unmix": True,
                "endmembers": 3,
                "tile": 32,
                "batch": 2,
                "workers": 1,
            },
        }
        fr = run_deployment(
            "process-scene/served-on-demand", parameters=params, timeout=360, poll_interval=2
        )
        log = (d / "serve.log").read_text()[-3000:]
        assert fr.state is not None and fr.state.is_completed(), f"{fr.state}\n{log}"

        arts = asyncio.run(_artifacts(fr.id))
        by_type: dict[str, list] = {}
        for a in arts:
            by_type.setdefault(a.type, []).append(a)
        assert {"progress", "markdown", "table"} <= set(by_type), sorted(by_type)
        (progress,) = by_type["progress"]
        assert float(progress.data) == pytest.approx(100.0)
        report = next(a for a in by_type["markdown"] if a.key and a.key.endswith("-report"))
        assert "enmap_potsdam_crop.tif" in report.data and "## Solver statistics" in report.data
        assert "data:image/png;base64," in report.data  # quicklooks embedded
        assert "![before_rgb](data:image/png;base64," in report.data
        assert "![abundances](data:image/png;base64," in report.data
        (table,) = by_type["table"]
        cols = str(table.data).lower().replace("_", " ")  # column names carry their units
        assert "reconstruction rmse" in cols and "nodata" in cols, table.data
        # image artifacts hold only a URL: none without an http(s) base URL, never a base64 payload
        assert not any(str(a.data).startswith("data:") for a in by_type.get("image", []))

    record = sorted(out.glob("*/*/run.json"))
    assert len(record) == 1
    import json

    rec = json.loads(record[0].read_text())
    assert rec["status"] == "complete"
    assert (record[0].parent / "quicklooks" / "abundances.png").is_file()
    assert (record[0].parent / "quicklooks" / "before_rgb.png").is_file()
    # the deployment's flow run is renamed `<scene stem> · <run id>` and tagged (issue 23 item 7)
    with temporary_settings({PREFECT_API_URL: api_url}):
        named = asyncio.run(_flow_run(fr.id))
    assert named.name == f"enmap_potsdam_crop · {rec['run_id']}", named.name
    assert {"hyperdeq", "scene:enmap_potsdam_crop", "model:deq-unmix"} <= set(named.tags), (
        named.tags
    )
    assert "served" in named.tags  # the deployment's own tags are kept


def test_prefect_deploy_accepts_the_repository_yaml(server) -> None:
    api_url, env, d = server
    archive, out = ROOT / "tests" / "data", ROOT / "hyperdeq-out"
    env = dict(
        env, HYPERDEQ_REPO=str(ROOT), HYPERDEQ_SWEEP_ROOT=str(archive), HYPERDEQ_OUT=str(out)
    )
    prefect = str(BIN / "prefect")
    r = subprocess.run(
        [prefect, "work-pool", "create", "hyperdeq-process", "--type", "process"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    async def _check() -> None:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            sweep = await client.read_deployment_by_name("sweep-archive/nightly-sweep")
            scene = await client.read_deployment_by_name("process-scene/on-demand")
            assert sweep.work_pool_name == scene.work_pool_name == "hyperdeq-process"
            assert [s.schedule.cron for s in sweep.schedules] == ["0 2 * * *"]
            assert sweep.parameters["max_concurrent"] == 2
            # paths come from the environment at deploy time, never from the file
            assert sweep.parameters["root"] == str(archive) and sweep.parameters["out_root"] == str(
                out
            )
            assert scene.parameters["out_dir"] == str(out)
            assert scene.schedules == []
            # {{ $HYPERDEQ_REPO }} is resolved when deploying: workers run from that checkout
            assert sweep.pull_steps[0]["prefect.deployments.steps.set_working_directory"][
                "directory"
            ] == str(ROOT)

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        asyncio.run(_check())
