"""Dask clients and the driver's own computations.

A sweep runs several scenes concurrently in one process, each with its own ``distributed.Client``.
If those clients were the process-wide default, the driver's small dask computations (a scene
window, the tile-validity mask, the unmixer's pixel sample) would run on whichever client was
default at that instant -- possibly one that another scene was closing (seen once in CI as a scene
failing next to a failing one). These tests make such a default *unusable* (a cluster without
workers: anything sent there waits forever) and check the driver's computations finish anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster, default_client

DATA = Path(__file__).resolve().parents[1] / "data"


def _finishes(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised in the test thread
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} did not finish: it waited on the default Dask client"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
def workerless_default_client() -> Iterator[Client]:
    with (
        LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        assert default_client() is client
        yield client


@pytest.mark.timeout(300)
def test_driver_computations_never_use_the_default_client(
    workerless_default_client: Client, tmp_path: Path
) -> None:
    from pipeline.ingest import ZarrSceneSource, ingest_scene
    from pipeline.tiles import tile_validity, write_valid_mask
    from workers.unmix.fit import _gather

    mask = np.zeros((40, 30), dtype=bool)
    mask[5:9, 20:25] = True
    dmask = da.from_array(mask, chunks=(16, 16))
    got = _finishes(lambda: tile_validity(dmask, 16))
    assert (
        got.tolist()
        == tile_validity(mask, 16).tolist()
        == [[False, True], [False, False], [False, False]]
    )

    zarr.open_group(str(tmp_path / "valid.zarr"), mode="w")
    _finishes(lambda: write_valid_mask(dmask, tmp_path / "valid.zarr", 16))
    assert np.array_equal(
        zarr.open_group(str(tmp_path / "valid.zarr"), mode="r")["valid"][...], mask
    )

    cube = np.arange(3 * 40 * 30, dtype=np.float32).reshape(3, 40, 30)
    ys, xs = np.array([0, 7, 39]), np.array([29, 3, 0])
    spectra = _finishes(lambda: _gather(da.from_array(cube, chunks=(3, 16, 16)), ys, xs))
    assert np.array_equal(spectra, cube[:, ys, xs])

    store = _finishes(
        lambda: ingest_scene(DATA / "enmap_berlin_tiny" / "enmap.tif", tmp_path / "s.zarr")
    )
    window = _finishes(lambda: ZarrSceneSource(store).read_raw(0, 4, 0, 5))
    assert window.shape[1:] == (4, 5) and np.isfinite(window).any()


@pytest.mark.timeout(300)
def test_hyperdeq_clients_are_never_the_process_default() -> None:
    from workers.cluster import ClusterSpec, open_cluster

    with open_cluster(ClusterSpec(n_workers=1), "cpu") as handle:
        try:
            current = default_client()
        except ValueError:  # no default client at all
            current = None
        assert current is not handle.client
        assert handle.n_workers() == 1 and handle.describe()["owned"] is True
