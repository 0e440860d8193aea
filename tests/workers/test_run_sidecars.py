"""A run is reused only for the same input: fixing an ENVI header must not return the old outputs."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.config import RunConfig
from pipeline.writers import open_output
from tests.pipeline.test_readers import GAMSBERG
from workers.infer import IdentityTileModel
from workers.run import Job, RunResult, run_scene


def test_fixed_envi_header_is_a_new_run_not_a_reuse(tmp_path: Path) -> None:
    data = tmp_path / "scene.bsq"
    shutil.copy(GAMSBERG, data)  # the real Gamsberg ENVI subset, 25 x 10 px, 189 bands
    hdr = tmp_path / "scene.bsq.hdr"
    hdr.write_text(GAMSBERG.with_suffix(".hdr").read_text())
    job = Job(RunConfig(out_root=tmp_path / "out", tile=16, halo=2), unmix=None)

    def run() -> RunResult:
        with ThreadPoolExecutor(1) as ex:
            return run_scene(data, job, cluster=ex, tile_models={"denoise": IdentityTileModel()})

    first = run()
    assert first.status == "complete" and not first.reused
    assert run().reused  # same input: the completed run is reused
    # the user learns the first 5 bands are bad and adds a bbl to the header; the data file is unchanged
    hdr.write_text(hdr.read_text() + "bbl = {" + ", ".join(["0"] * 5 + ["1"] * 184) + "}\n")
    second = run()
    assert not second.reused and second.run_id != first.run_id
    good = open_output(second.outputs["denoised_zarr"], "denoised")["good_band"].values
    assert not good[:5].any() and good[5:].all()
    den = open_output(second.outputs["denoised_zarr"], "denoised").values
    assert np.isnan(den[:5]).all() and np.isfinite(den[5:]).all()
