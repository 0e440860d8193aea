"""Load: a sweep over many small real scenes (a few deliberately corrupt) with a concurrency limit.

Scenes are found with the sweep's own discovery (:func:`flows.sweep.scan_archive`) and run with
:func:`workers.run.run_scene`, at most ``MAX_CONCURRENT`` at a time, on one multi-process Dask
cluster; every scene must end done or failed-with-reason in bounded time, and afterwards no worker
process and no temporary file may be left behind.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from tests.reliability._data import BERLIN, DEMO, GAMSBERG, PAVIA, TILE, crop_geotiff, read_cube

MAX_CONCURRENT = 2
SWEEP_TIMEOUT_S = 900
#: 32x32 blocks of the demo mosaic that hold data (row, col) = the 18 EnMAP Potsdam tiles
POTSDAM_BLOCKS = [
    (0, 0),
    (0, 32),
    (0, 64),
    (32, 0),
    (32, 32),
    (32, 64),
    (64, 96),
    (64, 128),
    (96, 32),
    (96, 64),
    (96, 96),
    (96, 128),
    (128, 32),
    (128, 64),
    (128, 96),
    (128, 128),
    (160, 96),
    (160, 128),
]


def build_archive(root: Path, n_good: int) -> dict[str, str]:
    """Write an archive of real scenes (``n_good`` good ones + 3 corrupt); returns name -> expectation."""
    root.mkdir(parents=True)
    expect: dict[str, str] = {}
    good: list[Any] = []
    for r, c in POTSDAM_BLOCKS:
        good.append((f"potsdam/enmap_tile_{c}_{r}.tif", dict(src=DEMO, row=r, col=c, size=32)))
    good.append(
        ("potsdam_tile128/enmap_tile_128_0.tif", dict(src=TILE, row=0, col=0, size=32, bands=None))
    )
    for i, (r, c) in enumerate([(100, 40), (100, 72), (100, 104), (120, 40), (120, 72)]):
        good.append((f"potsdam_shifted/crop_{i}.tif", dict(src=DEMO, row=r, col=c, size=32)))
    for name, kw in good[: max(0, n_good - 3)]:
        crop_geotiff(root / name, **kw)
        expect[name] = "complete"
    if n_good > len(good):
        (root / "berlin").mkdir()
        shutil.copy(BERLIN, root / "berlin" / "enmap_berlin.tif")
        shutil.copy(str(BERLIN) + ".aux.xml", root / "berlin" / "enmap_berlin.tif.aux.xml")
        expect["berlin/enmap_berlin.tif"] = "complete"
        (root / "gamsberg").mkdir()
        shutil.copy(GAMSBERG, root / "gamsberg" / "gamsberg.bsq")
        shutil.copy(str(GAMSBERG) + ".hdr", root / "gamsberg" / "gamsberg.bsq.hdr")
        expect["gamsberg/gamsberg.bsq"] = "complete"
        (root / "pavia").mkdir()
        shutil.copy(PAVIA, root / "pavia" / "paviaU_subimg.mat")
        expect["pavia/paviaU_subimg.mat"] = "complete"
    bad = root / "corrupt"
    bad.mkdir()
    src = crop_geotiff(root / ".staging" / "x.tif", size=32)
    (bad / "truncated.tif").write_bytes(src.read_bytes()[: src.stat().st_size // 3])
    expect["corrupt/truncated.tif"] = "ReadError"
    (bad / "not_a_tiff.tif").write_text("this is a field note, not a raster\n")
    expect["corrupt/not_a_tiff.tif"] = "ReadError"
    cube, prof = read_cube(src)
    import rasterio

    with rasterio.open(bad / "all_nodata.tif", "w", **prof) as d:
        d.write(np.full_like(cube, prof["nodata"]))
        d.update_tags(**{})
    expect["corrupt/all_nodata.tif"] = "InputValidationError"
    shutil.rmtree(root / ".staging")
    return expect


def sweep(root: Path, out: Path, client: Any, max_concurrent: int) -> dict[str, dict[str, str]]:
    """Library-level sweep: discover, then run each scene (max ``max_concurrent`` at once)."""
    from flows.sweep import scan_archive
    from pipeline.config import RunConfig
    from pipeline.errors import HyperdeqError
    from workers.infer import IdentityTileModel
    from workers.run import Job, run_scene

    patterns = ["**/*.tif"] + [p for p in ("**/*.bsq", "**/*.mat") if any(root.glob(p))]
    scenes = scan_archive(root, patterns=patterns)
    job = Job(RunConfig(out_root=out, tile=32, halo=4, batch_size=2), unmix=None)

    def one(scene: Path) -> dict[str, str]:
        try:
            res = run_scene(scene, job, client, tile_models={"denoise": IdentityTileModel()})
            return {"status": res.status, "reason": ",".join(res.failed_tiles)}
        except HyperdeqError as exc:
            return {"status": "failed", "error": type(exc).__name__, "reason": str(exc)}

    results: dict[str, dict[str, str]] = {}
    with ThreadPoolExecutor(max_concurrent) as pool:
        futs = {pool.submit(one, s): s for s in scenes}
        done, not_done = wait(futs, timeout=SWEEP_TIMEOUT_S)
        assert not not_done, f"sweep deadlocked or too slow: {len(not_done)} scenes unfinished"
        for f in done:
            results[str(futs[f].relative_to(root))] = f.result()
    return results


def _temp_files(*roots: Path) -> list[Path]:
    return [
        p
        for r in roots
        for p in r.rglob("*")
        if p.name.endswith((".tmp", ".tmp.tif")) or ".tmp." in p.name
    ]


def _run_sweep(case: Any, tmp_path: Path, n_good: int) -> None:
    from distributed import Client, LocalCluster

    root, out, scratch = tmp_path / "archive", tmp_path / "out", tmp_path / "scratch"
    expect = build_archive(root, n_good)
    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}
    t0 = time.monotonic()
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit="2GiB",
            local_directory=str(scratch),
        ) as cluster,
        Client(cluster) as client,
    ):
        worker_pids = set(client.run(os.getpid).values())
        results = sweep(root, out, client, MAX_CONCURRENT)
    wall = time.monotonic() - t0
    assert set(results) == set(expect)
    for name, want in expect.items():
        got = results[name]
        if want == "complete":
            assert got["status"] == "complete", (name, got)
        else:
            assert got["status"] == "failed" and got["error"] == want and got["reason"], (name, got)
    # nothing leaked: worker processes gone, no temporary files, no scratch worker folders
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in worker_pids):
        time.sleep(0.2)
    alive = [
        p
        for p in worker_pids
        if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]
    assert not alive, f"worker processes left running: {alive}"
    leaked = [
        " ".join(p.cmdline())[:200]
        for p in me.children(recursive=True)
        if p.pid not in children_before
        and p.status() != psutil.STATUS_ZOMBIE
        # multiprocessing's resource tracker: one per interpreter, by design lives until it exits
        and "multiprocessing.resource_tracker" not in " ".join(p.cmdline())
    ]
    assert not leaked, f"child processes left: {leaked}"
    assert not _temp_files(out, root), _temp_files(out, root)
    left = [
        p for p in scratch.rglob("*") if p.is_file() and p.suffix != ".lock"
    ]  # dask's own lock files stay
    assert not left, f"worker scratch files left behind: {left}"
    n_ok = sum(r["status"] == "complete" for r in results.values())
    case.measure(
        scenes=len(results),
        complete=n_ok,
        failed=len(results) - n_ok,
        max_concurrent=MAX_CONCURRENT,
        wall_s=round(wall, 1),
        failures={k: v["error"] for k, v in results.items() if v["status"] != "complete"},
    )


@pytest.mark.integration
def test_sweep_small(case, tmp_path: Path) -> None:
    case(
        "load",
        "sweep of 5 real scenes (2 Potsdam crops + 3 corrupt), 2 at a time, LocalCluster of 2 processes",
        "each scene complete or failed with its reason; no deadlock; no leaked processes or temp files",
    )
    _run_sweep(case, tmp_path, n_good=2 + 3)


@pytest.mark.slow
@pytest.mark.integration
def test_sweep_archive_of_30(case, tmp_path: Path) -> None:
    case(
        "load",
        "sweep of 30 real scenes (18 Potsdam tiles, the shipped 32x32 Potsdam tile, 5 shifted crops, EnMAP Berlin int16, "
        "Gamsberg ENVI, Pavia .mat, 3 corrupt), 2 at a time, LocalCluster of 2 processes",
        "27 complete, 3 failed with ReadError/InputValidationError; bounded time; nothing leaked",
    )
    _run_sweep(case, tmp_path, n_good=100)
