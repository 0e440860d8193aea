"""A real ``prefect server start`` on loopback for tests (SQLite in a tmp dir), always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prefect_env(home: Path, api_url: str | None = None, ui: bool = False) -> dict[str, str]:
    """Environment for a Prefect process isolated in ``home`` (its own DB, no analytics)."""
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="true" if ui else "false",
        PREFECT_LOGGING_LEVEL="INFO",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    return env


def wait_healthy(api_url: str, proc: subprocess.Popen | None = None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prefect server exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {api_url} not healthy after {timeout}s: {last}")


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a process we started (its own process group), escalating to SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@contextmanager
def prefect_server(home: Path, log_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """Start ``prefect server start`` on 127.0.0.1:<free port>; yield (api_url, client env)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = prefect_env(home)
    # `--port` alone leaves the UI calling the API on 4200 (docs/prefect.md, Production)
    env["PREFECT_SERVER_API_PORT"] = str(port)
    prefect_bin = str(Path(sys.executable).with_name("prefect"))
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [prefect_bin, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_healthy(api_url, proc)
            yield api_url, prefect_env(home, api_url=api_url)
        finally:
            stop(proc)


@contextmanager
def background(
    cmd: list[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in its own process group for the duration of the block, then stop it."""
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            cmd,
            env=dict(env),
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            stop(proc)
