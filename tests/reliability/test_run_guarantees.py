"""What a run guarantees around failures (issue 21, items 1, 3, 6 and 7).

* item 1: a run with a failed tile leaves no final-named output (they stay under ``_staging``);
  the rerun rewrites every output.
* item 3: a damaged output of a completed run (truncated COG, deleted zarr chunk, flipped byte) is
  found on rerun and recomputed, never reused.
* item 6: one process per run folder: a second run while the lock is held is refused naming the
  holder's host and pid; a stale lock (dead pid on this host) is taken over.
* item 7: SIGTERM (or SIGINT) during a run ends ``run.json`` ``cancelled`` and raises
  ``RunCancelled``; the same command resumes.

Every test runs the real pipeline (:func:`workers.run.run_scene`) on a real crop of the EnMAP demo
scene (64x64 px, 40 bands), with the identity tile model in a thread pool.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from pipeline import provenance as prov
from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.writers import open_output
from workers.infer import IdentityTileModel
from workers.run import LOCK, OUT_NAMES, Job, RunCancelled, RunResult, run_scene, verify_outputs

TILE, HALO = 24, 4  # 64 px = 24 + 24 + 16: read windows of 28, 32 and 20 px; one 20x20 corner tile
N_TILES = 9
DENOISE_OUTPUTS = {"denoised_zarr", "denoised_tif", "quicklook_rgb", "stac_item"}


def _job(out: Path, **cfg: Any) -> Job:
    return Job(RunConfig(out_root=out, tile=TILE, halo=HALO, **cfg), unmix=None)


def _run(scene: Path, out: Path, model: Any = None, **cfg: Any) -> RunResult:
    with ThreadPoolExecutor(2) as ex:
        return run_scene(
            scene,
            _job(out, **cfg),
            cluster=ex,
            tile_models={"denoise": model or IdentityTileModel()},
        )


def _final_outputs(run_dir: Path) -> set[str]:
    return {k for k, name in OUT_NAMES.items() if (run_dir / name).exists()}


def _digests(run_dir: Path) -> dict[str, str]:
    """sha256 of every data-bearing output file (zarr chunks, COG, PNG); timestamped metadata left out."""
    out: dict[str, str] = {}
    for key in ("denoised_zarr", "denoised_tif", "quicklook_rgb"):
        p = run_dir / OUT_NAMES[key]
        files = (
            [p]
            if p.is_file()
            else sorted(f for f in p.rglob("*") if f.is_file() and f.name != "zarr.json")
        )
        for f in files:
            out[str(f.relative_to(run_dir))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / prov.RUN_JSON).read_text())


@dataclass(frozen=True)
class FlakyIdentity:
    """Identity that fails on tiles of one read shape (same name/halo/hash as the identity model)."""

    fail_shape: tuple[int, int]
    halo: int = 0
    name: str = "identity"
    weights_sha256: str | None = None
    out_names: tuple[str, ...] | None = None

    def __call__(self, cube: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        if tuple(cube.shape[1:]) == self.fail_shape:
            raise RuntimeError(f"simulated worker crash on a {self.fail_shape} tile")
        return IdentityTileModel()(cube)


@dataclass(frozen=True)
class SlowIdentity:
    """Identity that waits ``delay`` s per tile, and blocks while ``gate`` is clear (when given)."""

    delay: float = 0.0
    gate: threading.Event | None = None
    calls: list[int] = field(default_factory=list)
    halo: int = 0
    name: str = "identity"
    weights_sha256: str | None = None
    out_names: tuple[str, ...] | None = None

    def __call__(self, cube: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        self.calls.append(1)
        if self.gate is not None:
            assert self.gate.wait(120), "the test never opened the gate"
        time.sleep(self.delay)
        return IdentityTileModel()(cube)


@pytest.fixture(scope="module")
def reference(demo_crop: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Digests of an undisturbed run of the crop."""
    res = _run(demo_crop, tmp_path_factory.mktemp("ref") / "out")
    assert res.status == "complete" and res.n_tiles == N_TILES
    return _digests(res.run_dir)


# ---------------------------------------------------------------------------- item 1
def test_failed_tile_leaves_no_final_output_and_the_rerun_rewrites_every_output(
    demo_crop: Path, tmp_path: Path, reference: dict[str, str], case: Any
) -> None:
    case(
        "fault",
        "one tile of 9 fails (the model raises on the 20x20 corner tile); then the same command again",
        "run.json 'failed' listing the tile, outputs {} and no final-named output (all under _staging); the "
        "rerun completes, recomputes only that tile and rewrites every output byte-identical to an undisturbed run",
    )
    bad = _run(demo_crop, tmp_path / "out", FlakyIdentity(fail_shape=(20, 20)))
    run_dir = bad.run_dir
    assert (
        bad.status == "failed"
        and bad.failed_tiles == ["denoise:r00002_c00002"]
        and bad.outputs == {}
    )
    rec = _record(run_dir)
    assert (
        rec["status"] == "failed"
        and rec["outputs"] == {}
        and rec["failed_tiles"] == ["denoise:r00002_c00002"]
    )
    assert _final_outputs(run_dir) == set()  # nothing that looks like a result
    staged = {k for k, name in OUT_NAMES.items() if (run_dir / "_staging" / name).exists()}
    assert staged == DENOISE_OUTPUTS - {"stac_item"}
    hole = open_output(run_dir / "_staging" / OUT_NAMES["denoised_zarr"], "denoised").values[
        :, 52:, 52:
    ]
    assert np.isnan(
        hole
    ).all()  # the failed tile's core (beyond its neighbours' halos) is empty, never filled
    assert (run_dir / "tiles").is_dir()  # kept: the rerun resumes from them

    good = _run(demo_crop, tmp_path / "out")
    assert good.status == "complete" and good.run_dir == run_dir and not good.reused
    assert json.loads((run_dir / "_stages" / "denoise.json").read_text())["n_reused"] == N_TILES - 1
    assert set(good.outputs) == DENOISE_OUTPUTS == _final_outputs(run_dir)
    assert not (run_dir / "_staging").exists() and verify_outputs(run_dir) == []
    assert (
        _digests(run_dir) == reference
    )  # every output rewritten: none kept from the failed attempt
    with rasterio.open(good.outputs["denoised_tif"]) as f:
        assert np.isfinite(f.read(1)[52:, 52:]).all()
    case.measure(
        failed_tile="r00002_c00002", reused_on_rerun=N_TILES - 1, outputs=sorted(good.outputs)
    )


# ---------------------------------------------------------------------------- item 3
def _truncate(p: Path) -> str:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return f"{p.name} truncated to half"


def _delete_chunk(p: Path) -> str:
    chunks = sorted(f for f in (p / "denoised").rglob("*") if f.is_file() and f.name != "zarr.json")
    chunks[len(chunks) // 2].unlink()
    return f"one of {len(chunks)} chunks of {p.name}/denoised deleted"


def _flip_byte(p: Path) -> str:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))
    return f"one byte of {p.name} flipped (same size)"


@pytest.mark.parametrize(
    ("key", "damage"),
    [("denoised_tif", _truncate), ("denoised_zarr", _delete_chunk), ("quicklook_rgb", _flip_byte)],
)
def test_damaged_output_of_a_completed_run_is_recomputed_not_reused(
    demo_crop: Path,
    tmp_path: Path,
    reference: dict[str, str],
    key: str,
    damage: Any,
    case: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    case(
        "fault",
        f"a completed run's {OUT_NAMES[key]} is damaged, then the same command again",
        "the rerun finds the damage (size/sha256 against run.json), says so, recomputes the run and "
        "restores byte-identical outputs; an intact run is reused",
    )
    first = _run(demo_crop, tmp_path / "out")
    assert first.status == "complete" and _digests(first.run_dir) == reference
    what = damage(first.run_dir / OUT_NAMES[key])
    problems = verify_outputs(first.run_dir)
    assert len(problems) == 1 and OUT_NAMES[key] in problems[0]
    model = SlowIdentity()
    with caplog.at_level(logging.WARNING, logger="hyperdeq.run"):
        again = _run(demo_crop, tmp_path / "out", model)
    assert not again.reused and again.status == "complete" and again.run_dir == first.run_dir
    assert any(
        "damaged outputs" in r.getMessage() and OUT_NAMES[key] in r.getMessage()
        for r in caplog.records
    )
    assert len(model.calls) == N_TILES  # recomputed (the tile stores of a completed run are gone)
    assert verify_outputs(first.run_dir) == [] and _digests(first.run_dir) == reference
    third = _run(demo_crop, tmp_path / "out", model)
    assert third.reused and len(model.calls) == N_TILES  # intact now: reused, nothing recomputed
    case.measure(damage=what, detected=problems[0][:120], tiles_recomputed=N_TILES)


# ---------------------------------------------------------------------------- item 6
def test_second_run_on_a_locked_run_folder_is_refused(
    demo_crop: Path, tmp_path: Path, case: Any
) -> None:
    case(
        "fault",
        "a second run of the same scene and options while the first one holds the run folder",
        "ConfigError naming the holder's host and pid, before touching anything; the first run completes",
    )
    gate = threading.Event()
    result: dict[str, Any] = {}

    def first() -> None:
        try:
            result["res"] = _run(demo_crop, tmp_path / "out", SlowIdentity(gate=gate))
        except BaseException as exc:  # re-raised below
            result["error"] = exc

    t = threading.Thread(target=first, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(f"out/*/*/{prov.RUN_JSON}")) and time.monotonic() < deadline:
            time.sleep(0.05)  # the record is written once the lock is held
        (lock,) = tmp_path.glob(f"out/*/*/{LOCK}")
        run_dir = lock.parent
        held = json.loads(lock.read_text())
        assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
        with pytest.raises(
            ConfigError,
            match=rf"run folder .* is in use by another hyperdeq run \(host "
            rf"'{socket.gethostname()}', pid {os.getpid()}, started '.+'\)",
        ):
            _run(demo_crop, tmp_path / "out")
        assert (
            _record(run_dir)["status"] == "running" and lock.is_file()
        )  # the holder's state is untouched
    finally:
        gate.set()
        t.join(120)
    assert "error" not in result, result.get("error")
    assert result["res"].status == "complete" and not (run_dir / LOCK).exists()
    case.measure(holder=f"{held['host']}:{held['pid']}")


def test_lock_of_another_host_is_refused_and_a_dead_pid_lock_is_taken_over(
    demo_crop: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: Any
) -> None:
    case(
        "fault",
        "a run folder whose lock names another host, then one whose lock names a dead pid on this host",
        "another host's lock is refused (its pid cannot be checked from here); a dead pid's lock is taken over "
        "and the run completes, leaving no lock",
    )
    from workers.run import plan_run

    plan = plan_run(demo_crop, _job(tmp_path / "out"), tile_models={"denoise": IdentityTileModel()})
    plan.run_dir.mkdir(parents=True)
    lock = plan.run_dir / LOCK
    lock.write_text(
        json.dumps({"host": "elsewhere.example", "pid": 1, "start": "2026-01-01T00:00:00Z"})
    )
    with pytest.raises(
        ConfigError,
        match=r"in use by another hyperdeq run \(host 'elsewhere\.example', pid 1, "
        r"started '2026-01-01T00:00:00Z'\).*delete '.*\.hyperdeq\.lock'",
    ):
        _run(demo_crop, tmp_path / "out")
    assert not (plan.run_dir / prov.RUN_JSON).exists()  # refused before the record was written
    # a lock just created is empty until its holder writes it: the holder is still named
    from workers.run import run_lock

    lock.write_text("")
    threading.Timer(
        0.3, lock.write_text, (json.dumps({"host": "elsewhere.example", "pid": 7, "start": "s"}),)
    ).start()
    with pytest.raises(
        ConfigError, match=r"in use by another hyperdeq run \(host 'elsewhere\.example', pid 7, "
    ):
        with run_lock(plan.run_dir):
            pass
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start": "2026-01-01T00:00:00Z"})
    )
    with caplog.at_level(logging.WARNING, logger="hyperdeq.run"):
        res = _run(demo_crop, tmp_path / "out")
    assert res.status == "complete" and res.run_dir == plan.run_dir and not lock.exists()
    assert any(f"stale lock of pid {dead.pid}" in r.getMessage() for r in caplog.records)
    case.measure(dead_pid=dead.pid)


# ---------------------------------------------------------------------------- item 7
@dataclass(frozen=True)
class SignalDuringTiles(SlowIdentity):
    """Slow identity whose first call has ``signum`` sent to this process shortly after (the
    handler runs in the main thread, which is waiting for the tile batches)."""

    signum: int = signal.SIGTERM
    sent: list[int] = field(default_factory=list)

    def __call__(self, cube: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        if not self.sent:
            self.sent.append(1)
            threading.Timer(0.2, os.kill, (os.getpid(), self.signum)).start()
        return super().__call__(cube)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_a_run_ends_the_record_cancelled(
    demo_crop: Path, tmp_path: Path, signum: int, case: Any
) -> None:
    name = signal.Signals(signum).name
    case(
        "fault",
        f"{name} sent to the driver while the denoise tiles run (in-process thread pool)",
        f"RunCancelled (exit code {128 + signum}) raised, run.json 'cancelled' with the stage, no final-named "
        "output, the lock released and the previous handlers restored; the same command resumes to a complete run",
    )
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    model = SignalDuringTiles(delay=0.5, signum=signum)
    with pytest.raises(RunCancelled, match=f"stopped by {name}") as info:
        _run(demo_crop, tmp_path / "out", model)
    assert info.value.exit_code == 128 + signum
    assert {s: signal.getsignal(s) for s in before} == before
    (run_dir,) = [p.parent for p in tmp_path.glob(f"out/*/*/{prov.RUN_JSON}")]
    rec = _record(run_dir)
    assert (
        rec["status"] == "cancelled"
        and rec["failed_stage"] == "denoise"
        and "RunCancelled" in rec["error"]
    )
    assert (
        rec["outputs"] == {} and _final_outputs(run_dir) == set() and not (run_dir / LOCK).exists()
    )
    assert not (run_dir / "_stages" / "denoise.json").exists()  # stopped before the stage finished
    res = _run(demo_crop, tmp_path / "out")
    assert res.status == "complete" and res.run_dir == run_dir and verify_outputs(run_dir) == []
    reused = json.loads((run_dir / "_stages" / "denoise.json").read_text())["n_reused"]
    assert 0 < reused <= N_TILES  # tiles finished before (and while) the run was stopped are kept
    case.measure(reused_on_rerun=reused)


def test_pixel_level_bad_input_is_refused_before_any_cluster_starts(tmp_path: Path) -> None:
    """Issue 21 item 10: checks that need the pixels (an infinity here) run in the ingest stage, in
    this process, before the cluster opens (it opens when the first stage that needs it starts)."""
    import shutil
    import sys

    scene = tmp_path / "inf.tif"
    shutil.copy(
        Path(__file__).resolve().parents[1]
        / "data"
        / "enmap_potsdam_tile"
        / "enmap_potsdam_tile_128_0.tif",
        scene,
    )
    with rasterio.open(scene, "r+") as f:
        band = f.read(5)
        band[3, 3] = np.inf
        f.write(band, 5)
    exe = Path(sys.executable).with_name("hyperdeq")
    r = subprocess.run(
        [str(exe), "run", str(scene), "--out", str(tmp_path / "out"), "--no-unmix"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "infinite value inf" in out and "band 4, row 3, col 3" in out and "Traceback" not in out
    assert "tile batches run on" not in out  # no Dask cluster was started
    (rec,) = (tmp_path / "out").glob("*/*/run.json")
    assert json.loads(rec.read_text())["failed_stage"] == "ingest"
