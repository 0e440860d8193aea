"""The README's main command: ``hyperdeq demo`` end to end, as a user runs it.

Runs the real CLI in a fresh process (temporary Prefect server, local Dask cluster with worker
processes, shipped DECSC weights, DEQ-Unmix fit) on the bundled EnMAP window, then checks what
a user gets: georeferenced outputs matching the input grid, nodata kept, a complete run record,
and that a second run reuses the completed run instead of recomputing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


def _demo(out: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(out.parent / "prefect-home")  # a private database for this test
    cmd = [sys.executable, "-m", "flows.cli", "demo", "--out", str(out)]
    # its own process group: on a timeout the temporary Prefect server and the Dask workers the
    # command started are stopped too (killing the command alone leaves them running)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=840)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.timeout(900)
def test_demo_runs_the_full_flow_and_outputs_are_georeferenced(tmp_path: Path) -> None:
    import rasterio

    out = tmp_path / "demo-output"
    res = _demo(out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "outputs:" in res.stdout
    src = out / "input" / "enmap_potsdam_demo_96x96.tif"
    runs = [p.parent for p in out.glob("enmap_potsdam_demo_96x96/*/run.json")]
    assert len(runs) == 1, runs
    run = runs[0]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "complete", record.get("status")

    from pipeline.readers import open_scene

    scene = open_scene(src)
    inp, good = scene.values, scene["good_band"].values
    nodata_in = ~np.isfinite(inp[good]).all(axis=0)
    assert nodata_in.any() and not nodata_in.all()  # the window has nodata corners

    with rasterio.open(src) as s:
        crs, transform, shape = s.crs, s.transform, (s.height, s.width)
    with rasterio.open(run / "denoised.tif") as d:
        assert d.crs == crs and d.transform == transform and (d.height, d.width) == shape
        den = d.read()
    assert den.shape == inp.shape
    valid = np.isfinite(den[good]).all(axis=0)
    # nodata stays nodata, data stays data; bad bands stay NaN as in the input
    np.testing.assert_array_equal(~valid, nodata_in)
    assert np.isnan(den[~good]).all()
    # a real change, not a copy, and a small one relative to the signal (EnMAP L2A is clean)
    diff = np.abs(den[good][:, valid] - inp[good][:, valid])
    assert 1e-4 < float(diff.mean()) < 0.05 * float(np.abs(inp[good][:, valid]).mean())
    with rasterio.open(run / "abundances.tif") as a:
        assert a.crs == crs and a.transform == transform
        ab = a.read()
    p = ab.shape[0]
    assert 2 <= p <= 12
    s = ab[:, valid].sum(axis=0)
    np.testing.assert_allclose(s, 1.0, atol=1e-3)  # abundances sum to one
    assert (ab[:, valid] >= -1e-6).all()
    assert np.isnan(ab[:, ~valid]).all()
    end = (run / "endmembers.csv").read_text().splitlines()
    assert len(end) > 100 and "wavelength" in end[0].lower()

    # second run: the completed run is found and reused, nothing recomputed, same record
    res2 = _demo(out)
    assert res2.returncode == 0, res2.stdout[-3000:] + res2.stderr[-3000:]
    assert [p.parent for p in out.glob("enmap_potsdam_demo_96x96/*/run.json")] == runs
    again = json.loads((run / "run.json").read_text())
    assert again["run_id"] == record["run_id"] and again.get("end") == record.get("end")
