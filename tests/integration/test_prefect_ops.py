"""Issue 23 item 6: retries only for transient faults, a per-stage timeout, a scene concurrency limit
that only applies when the server defines it, and the deploy/automations.yaml alert fired by a
failed run -- against a real ``prefect server start`` on loopback (the webhook it calls is a tiny
HTTP server on 127.0.0.1 started here; nothing else is reached)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.flows.prefect_server import prefect_server

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TIMEOUT = int(os.environ.get("HYPERDEQ_INTEGRATION_TIMEOUT", "420"))


# ------------------------------------------------------------------ no server: the retry condition
def _failed(exc: BaseException) -> Any:
    from prefect.states import Failed

    return Failed(
        data=exc, message=f"Task run encountered an exception: {exc!r}"
    )  # what Prefect passes


def test_retry_condition_on_real_prefect_states() -> None:
    from prefect.states import Completed
    from prefect.task_engine import TaskRunTimeoutError

    from flows.scene_flow import _retry_transient
    from pipeline.errors import ClusterError, ConfigError, ModelError

    for transient in (
        ClusterError("scheduler at tcp://x:8786 lost"),
        TimeoutError("read timed out"),
        ConnectionError("connection reset"),
    ):
        assert _retry_transient(None, None, _failed(transient)) is True, transient
    for bad in (
        ConfigError("halo 8 >= tile 8"),
        ValueError("not a hyperspectral cube"),
        FileNotFoundError("scene.tif"),
        ModelError("weights sha256 mismatch"),
        TaskRunTimeoutError("stage ran past its timeout"),
    ):
        assert _retry_transient(None, None, _failed(bad)) is False, bad
    assert _retry_transient(None, None, Completed()) is False


def test_stage_timeout_spec() -> None:
    from flows.scene_flow import stage_timeout

    assert stage_timeout("denoise", "") is None
    assert stage_timeout("denoise", "3600") == 3600.0
    spec = "denoise=7200, unmix=1800, *=600"
    assert [stage_timeout(s, spec) for s in ("denoise", "unmix", "ingest")] == [
        7200.0,
        1800.0,
        600.0,
    ]
    assert stage_timeout("ingest", "denoise=7200") is None
    assert stage_timeout("ingest", "denoise=7200,*=0") is None
    with pytest.raises(ValueError, match="HYPERDEQ_STAGE_TIMEOUT_S.*not a number"):
        stage_timeout("denoise", "denoise=an hour")
    with pytest.raises(ValueError, match="must be positive"):
        stage_timeout("denoise", "-5")


# ------------------------------------------------------------------------------ real server
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str], Path]]:
    d = tmp_path_factory.mktemp("prefect-ops")
    with prefect_server(d / "home", d / "server.log") as (api_url, env):
        env = {**env, "PYTHONPATH": str(ROOT)}
        env.pop("HYPERDEQ_STAGE_TIMEOUT_S", None)
        yield api_url, env, d


def _py(env: dict[str, str], code: str, timeout: float = 240, **extra_env: str) -> dict[str, Any]:
    """Run ``code`` against the test server in a fresh process; it prints one JSON line last."""
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**env, **extra_env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.integration
@pytest.mark.timeout(TIMEOUT)
def test_transient_retried_bad_input_and_timeout_not(server: Any) -> None:
    _, env, _ = server
    out = _py(
        env,
        """
        import json, time
        from prefect import flow, task
        from flows.scene_flow import STAGE_RETRIES, _prefect_call, _retry_transient
        from pipeline.errors import ClusterError, ConfigError

        n = {"transient": 0, "bad": 0, "slow": 0}

        def transient():
            n["transient"] += 1
            if n["transient"] <= STAGE_RETRIES:
                raise ClusterError("scheduler tcp://127.0.0.1:1 lost")
            return "ok"

        def bad():
            n["bad"] += 1
            raise ConfigError("halo 8 >= tile 8")

        def slow():
            n["slow"] += 1
            time.sleep(60)

        class Progress:
            def stage_done(self, name):
                pass

        @flow(name="ops-retries")
        def ops():
            t = task(transient, name="transient", retries=STAGE_RETRIES, retry_delay_seconds=0,
                     retry_condition_fn=_retry_transient)  # the stage tasks' condition, without the delays
            res = {"transient": t()}
            call = _prefect_call("scene.tif", Progress())  # the stage tasks themselves
            for name, fn in (("bad", bad), ("slow", slow)):
                t0 = time.monotonic()
                try:
                    call(name, fn)
                except Exception as exc:
                    res[name] = [type(exc).__name__, round(time.monotonic() - t0, 1)]
            return res

        print(json.dumps({"res": ops(), "attempts": n}))
    """,
        HYPERDEQ_STAGE_TIMEOUT_S="slow=3,*=0",
    )
    assert out["res"]["transient"] == "ok"
    assert out["attempts"] == {
        "transient": 3,
        "bad": 1,
        "slow": 1,
    }  # 2 retries; bad input and timeout: none
    assert out["res"]["bad"][0] == "ConfigError"
    assert (
        out["res"]["slow"][0] == "TaskRunTimeoutError" and out["res"]["slow"][1] < 30
    )  # stopped at ~3 s


@pytest.mark.integration
@pytest.mark.timeout(TIMEOUT)
def test_scene_slot_only_when_the_server_defines_the_limit(server: Any) -> None:
    _, env, _ = server
    out = _py(
        env,
        """
        import json
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from flows.scene_flow import SCENE_LIMIT, scene_slot

        with scene_slot():  # no limit on the server: nothing to acquire, nothing blocks
            pass
        with get_client(sync_client=True) as c:
            c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=SCENE_LIMIT, limit=1))
            with scene_slot():
                inside = c.read_global_concurrency_limit_by_name(SCENE_LIMIT).active_slots
            after = c.read_global_concurrency_limit_by_name(SCENE_LIMIT).active_slots
            c.delete_global_concurrency_limit_by_name(SCENE_LIMIT)
        print(json.dumps({"inside": inside, "after": after}))
    """,
    )
    assert out == {"inside": 1, "after": 0}


class _Hook(BaseHTTPRequestHandler):
    posts: list[dict[str, Any]] = []
    got = threading.Event()

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).posts.append({"path": self.path, "body": body.decode("utf-8", "replace")})
        self.send_response(200)
        self.end_headers()
        type(self).got.set()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.integration
@pytest.mark.timeout(TIMEOUT)
def test_automation_recipe_notifies_on_a_failed_run(server: Any, tmp_path: Path) -> None:
    import yaml

    api_url, env, d = server
    hook = HTTPServer(("127.0.0.1", 0), _Hook)
    th = threading.Thread(target=hook.serve_forever, daemon=True)
    th.start()
    try:
        url = f"http://127.0.0.1:{hook.server_address[1]}/hyperdeq-alert"
        block = _py(
            env,
            f"""
            import json
            from prefect.blocks.notifications import CustomWebhookNotificationBlock
            b = CustomWebhookNotificationBlock(name="hyperdeq-alerts", url={url!r}, method="POST",
                                               allow_private_urls=True,
                                               json_data={{"subject": "{{{{subject}}}}", "body": "{{{{body}}}}"}})
            print(json.dumps({{"id": str(b.save("hyperdeq-alerts", overwrite=True))}}))
        """,
        )
        recipe = (ROOT / "deploy" / "automations.yaml").read_text()
        assert "${HYPERDEQ_ALERT_BLOCK_ID}" in recipe
        filled = tmp_path / "automations.yaml"
        filled.write_text(
            recipe.replace("${HYPERDEQ_ALERT_BLOCK_ID}", block["id"])
        )  # what envsubst does
        (auto,) = yaml.safe_load(filled.read_text())["automations"]
        prefect = str(BIN / "prefect")
        r = subprocess.run(
            [prefect, "automation", "create", "--from-file", str(filled)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0 and "Created automation" in r.stdout, r.stdout + r.stderr
        r = subprocess.run(
            [prefect, "automation", "ls"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert auto["name"] in r.stdout, r.stdout + r.stderr

        # a failing run of a flow named like hyperdeq's (the trigger matches flows by name)
        failed = _py(
            env,
            """
            import json
            from prefect import flow

            @flow(name="process-scene", flow_run_name="broken-scene")
            def process_scene():
                raise ValueError("not a hyperspectral cube")

            st = process_scene(return_state=True)
            print(json.dumps({"state": st.name}))
        """,
        )
        assert failed["state"] == "Failed"
        arrived = _Hook.got.wait(120)
        log = (d / "server.log").read_text(errors="replace")[-3000:]
        assert arrived, f"no notification POST within 120 s; server log tail:\n{log}"
        body = _Hook.posts[0]["body"]
        assert _Hook.posts[0]["path"] == "/hyperdeq-alert"
        assert "broken-scene" in body and "Failed" in body and "process-scene" in body, body
    finally:
        hook.shutdown()
        hook.server_close()


def test_deployments_carry_the_limits_and_a_valid_stage_timeout() -> None:
    import yaml

    from flows.scene_flow import stage_timeout

    cfg = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in cfg["deployments"]}
    assert deps["on-demand"]["concurrency_limit"] == {"limit": 4, "collision_strategy": "ENQUEUE"}
    assert deps["nightly-sweep"]["concurrency_limit"] == 1
    spec = cfg["definitions"]["work_pools"]["process_pool"]["job_variables"]["env"][
        "HYPERDEQ_STAGE_TIMEOUT_S"
    ]
    assert stage_timeout("denoise", spec) == 86400.0 and stage_timeout("ingest", spec) == 21600.0
    (auto,) = yaml.safe_load((ROOT / "deploy" / "automations.yaml").read_text())["automations"]
    assert set(auto["trigger"]["expect"]) == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
