"""Issue 22: tile batches keep every worker busy (``n_workers`` in ``plan_batches``/``run_tiles``)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from pipeline.errors import ConfigError
from pipeline.grid import plan_grid
from pipeline.records import TileRecord
from pipeline.runner import TileJob, _work, plan_batches, run_tiles


def _grid(n_rows: int, n_cols: int):
    return plan_grid((8 * n_rows, 8 * n_cols), 8, 2)


@pytest.mark.parametrize(
    "n_tiles, batch, workers, n_batches",
    [
        (4, 4, 2, 2),  # the case: one batch of 4 left a worker idle
        (3, 4, 2, 2),
        (1, 4, 2, 1),
        (5, 4, 2, 2),
        (8, 4, 2, 2),
        (12, 4, 2, 3),  # large stages keep batch_size
        (7, 4, 3, 3),
        (4, 4, 8, 4),
        (6, 1, 2, 6),
        (6, 4, None, 2),  # default: consecutive groups of batch_size
    ],
)
def test_plan_batches_spreads_small_stages(
    n_tiles: int, batch: int, workers: int | None, n_batches: int
) -> None:
    grid = _grid(1, n_tiles)
    batches = plan_batches(grid.tiles, batch, workers)
    assert len(batches) == n_batches
    assert sorted(t for b in batches for t in b) == sorted(grid.tiles)  # every tile once
    assert all(list(b) == sorted(b) and 0 < len(b) <= batch for b in batches)  # row-major
    if workers is not None:
        assert len(batches) >= min(n_tiles, workers)
        loads = [sum(_work(t) for t in b) for b in batches]
        assert loads == sorted(loads, reverse=True)  # heaviest first
        assert max(loads) - min(loads) <= max(_work(t) for t in grid.tiles)  # balanced


def test_batches_balance_the_pixels_of_clipped_edge_tiles() -> None:
    """The demo mosaic's geometry (192 x 160 px, tile 128, halo 16): one 144 x 144 tile and three
    clipped ones. Consecutive pairs gave one worker 27,648 read pixels and the other 15,360;
    balanced, the big tile runs alone and the three clipped ones together (20,736 / 22,272)."""
    grid = plan_grid((192, 160), 128, 16)
    batches = plan_batches(grid.tiles, 4, 2)
    assert sorted(sum(_work(t) for t in b) for b in batches) == [20_736, 22_272]
    assert [len(b) for b in batches] == [3, 1]


def test_default_is_unchanged() -> None:
    grid = _grid(3, 3)
    assert plan_batches(grid.tiles, 4) == plan_batches(grid.tiles, 4, None)
    assert [len(b) for b in plan_batches(grid.tiles, 4)] == [4, 4, 1]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_n_workers_rejected(bad: Any) -> None:
    with pytest.raises(ConfigError, match="n_workers must be a positive integer"):
        plan_batches(_grid(1, 2).tiles, 4, bad)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        plan_batches(_grid(1, 2).tiles, 0, 2)


def test_run_tiles_submits_one_batch_per_worker_for_a_small_scene(tmp_path) -> None:
    grid = _grid(2, 2)  # 4 tiles
    submitted: list[int] = []

    def submit(fn: Any, job: TileJob) -> Future:
        submitted.append(len(job.tiles))
        fut: Future = Future()
        fut.set_result([TileRecord(key=t.key, index=t.index, status="ok") for t in job.tiles])
        return fut

    with ThreadPoolExecutor(2) as ex:
        res = run_tiles(
            ex,
            object(),
            tmp_path,
            tmp_path,
            grid,
            batch_size=4,
            n_workers=2,
            resume=False,
            submit=submit,
        )
        assert submitted == [2, 2]
        assert [r["key"] for r in res.records] == [t.key for t in sorted(grid.tiles)]
        submitted.clear()
        run_tiles(ex, object(), tmp_path, tmp_path, grid, batch_size=4, resume=False, submit=submit)
        assert submitted == [4]  # without n_workers: as before
