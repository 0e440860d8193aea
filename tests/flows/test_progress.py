"""Issue 23 item 4: progress moves per finished tile (not per batch), with an ETA.

``run_tiles`` reports each tile as it is committed: in-process for a ``ThreadPoolExecutor``, and
through Dask events (``workers.tile_feed``) for a distributed client. The tile I/O is replaced by
in-memory fakes so that only the progress path is under test.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from flows.artifacts import SceneProgress
from pipeline import runner
from pipeline.grid import plan_grid

GATE_S = 20.0


#: gate and call count per model id (module state, so the model itself pickles for Dask; the test
#: cluster runs in this process)
_STATE: dict[int, dict[str, Any]] = {}


class GatedModel:
    """Tile 0 returns at once; every later tile waits until the test opens the gate."""

    name, halo, weights_sha256, out_names = "gated", 0, None, None

    def __init__(self) -> None:
        self.id = len(_STATE)
        _STATE[self.id] = {"gate": threading.Event(), "calls": 0}

    @property
    def gate(self) -> threading.Event:
        return _STATE[self.id]["gate"]

    def __call__(self, cube: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        st = _STATE[self.id]
        st["calls"] += 1
        if st["calls"] > 1:
            assert st["gate"].wait(GATE_S), "the test never opened the gate"
        return cube, {"iterations": 1, "residual": 0.0, "converged": True}


@pytest.fixture
def fake_io(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    written: list[dict[str, Any]] = []
    monkeypatch.setattr(
        runner, "read_tile", lambda src, grid, tile: np.zeros((1, 2, 2), np.float32)
    )
    monkeypatch.setattr(runner, "tile_checksum", lambda cube: "in")
    monkeypatch.setattr(runner, "write_tile_output", lambda dest, grid, tile, arr: "out")
    monkeypatch.setattr(runner, "write_record", lambda dest, rec: written.append(rec))
    return written


def _run_in_thread(
    ex: Any, model: GatedModel, tmp_path: Any, calls: list[tuple[int, int]], **kw: Any
) -> tuple[threading.Thread, dict[str, Any]]:
    grid = plan_grid((16, 16), 8, 2)  # 4 tiles, one batch of 4
    out: dict[str, Any] = {}

    def body() -> None:
        out["res"] = runner.run_tiles(
            ex,
            model,
            tmp_path,
            tmp_path,
            grid,
            batch_size=4,
            resume=False,
            progress=lambda d, t, r: calls.append((d, t)),
            **kw,
        )

    th = threading.Thread(target=body, daemon=True)
    th.start()
    return th, out


def _wait_for(pred: Any, timeout: float = GATE_S) -> bool:
    ev = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if pred():
            return True
        ev.wait(0.05)
    return pred()


def test_thread_pool_reports_each_tile_before_its_batch_ends(tmp_path: Any, fake_io: Any) -> None:
    model = GatedModel()
    calls: list[tuple[int, int]] = []
    with ThreadPoolExecutor(1) as ex:
        th, out = _run_in_thread(ex, model, tmp_path, calls)
        # the batch of 4 is still running (tile 1 waits on the gate), yet tile 0 is reported
        assert _wait_for(lambda: calls == [(1, 4)]), calls
        model.gate.set()
        th.join(GATE_S)
    assert not th.is_alive()
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # once per tile, in order, never twice
    assert [r["status"] for r in out["res"].records] == ["ok"] * 4


def test_dask_client_reports_each_tile_through_events(tmp_path: Any, fake_io: Any) -> None:
    from distributed import Client, LocalCluster

    from workers.tile_feed import DaskTileFeed, feed_for

    model = GatedModel()
    calls: list[tuple[int, int]] = []
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        ex = client.get_executor(pure=False)
        feed = feed_for(client, ex, tmp_path / "denoise.zarr")
        assert isinstance(feed, DaskTileFeed) and feed.topic.endswith("denoise.zarr")
        assert (
            feed_for(client, ThreadPoolExecutor(1), tmp_path) is None
        )  # not this client's executor
        th, out = _run_in_thread(ex, model, tmp_path, calls, feed=feed)
        assert _wait_for(lambda: calls == [(1, 4)]), (
            calls
        )  # via the event topic, batch still running
        model.gate.set()
        th.join(GATE_S)
        assert not th.is_alive()
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [r["status"] for r in out["res"].records] == ["ok"] * 4


def test_process_batch_ignores_a_failing_notify(fake_io: Any) -> None:
    grid = plan_grid((8, 8), 8, 2)

    def boom(rec: dict[str, Any]) -> None:
        raise RuntimeError("monitoring down")

    model = GatedModel()
    job = runner.TileJob("src", "dst", grid, tuple(grid.tiles), model, "denoise", boom)
    assert [r["status"] for r in runner.process_batch(job)] == ["ok"]


def test_scene_progress_eta_from_stage_elapsed_and_tiles_done() -> None:
    now = [100.0]
    p = SceneProgress(
        "k",
        "scene.tif",
        ["ingest", "tile", "denoise", "blend_denoise", "write"],
        min_interval_s=0.0,
        clock=lambda: now[0],
    )
    now[0] = 110.0
    p.stage_done("ingest")
    now[0] = 115.0
    p.stage_done("tile")
    now[0] = 115.0 + 600.0  # first denoise tile after 10 min
    p("denoise", 1, 4)
    assert p.eta_s == pytest.approx(1800.0)
    assert p.description == "scene.tif: denoise 1/4 tiles, ETA 30 min 00 s"
    assert p.percent == pytest.approx(45.0)  # (2 stages + 1/4) / 5, not stuck at 40 %
    now[0] = 115.0 + 1200.0
    p("denoise", 2, 4)
    assert p.eta_s == pytest.approx(1200.0) and p.percent == pytest.approx(50.0)
    now[0] = 115.0 + 3 * 3600.0
    p("denoise", 3, 4)
    assert "ETA 1 h 00 min" in p.description
    p("denoise", 4, 4)
    assert p.eta_s == 0.0 and p.description == "scene.tif: denoise 4/4 tiles"
    p.stage_done("denoise")
    assert p.eta_s is None and p.percent == pytest.approx(60.0)
