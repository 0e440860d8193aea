"""Artifacts (keys, report, quality table, progress, quicklooks of a real run) without a Prefect server;
the rendering itself is tested in tests/pipeline/test_quicklooks.py."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from flows import artifacts as art
from pipeline import quicklooks as ql


def test_artifact_keys_are_prefect_safe() -> None:
    assert (
        art.artifact_key("hyperdeq", "ENMAP01_L2A.Spectral Image", "report")
        == "hyperdeq-enmap01-l2a-spectral-image-report"
    )
    assert art.artifact_key("--", "") == "hyperdeq"


def test_solver_summary_and_report() -> None:
    stats = [
        {"iterations": 5, "residual": 1e-4, "converged": True},
        {"iterations": 20, "residual": 3e-2, "converged": False},
    ]
    s = art.solver_summary(stats)
    assert s["convergence_rate"] == 0.5 and s["not_converged"] == 1 and s["iterations_max"] == 20
    summary = art.SceneSummary(
        scene="/data/a.tif",
        out_dir="/o",
        record_path="/o/run.json",
        input_sha256="ab" * 32,
        config_hash="cd" * 32,
        config={"tile": 64, "halo": 16},
        models=[{"name": "deq-unmix", "weights_sha256": None, "halo": 16}],
        timings_s={"ingest": 1.0, "unmix": 2.5},
        solver={"unmix": s},
        failed_tiles=[{"stage": "unmix", "index": "t_0_1", "error": "ModelError: diverged"}],
        outputs={"abundances_tif": "/o/abundances.tif"},
        quality={"nodata_fraction": 0.42123, "reconstruction_rmse": 0.0123456789},
    )
    md = art.report_markdown(summary)
    for frag in (
        "# hyperdeq run: `a.tif`",
        "tile=64",
        "fitted per scene",
        "| **total** | **3.50** |",
        "| unmix | 2 | 1/2 | 12.5 / 20 | 1.50e-02 / 3.00e-02 |",
        art.SOLVER_NOTE,
        "| reconstruction RMSE (reflectance) | 0.0123 |",
        "| nodata (%) | 42.1 |",
        "## Failed tiles (1)",
        "t_0_1: ModelError: diverged",
        "/o/abundances.tif",
        "/o/run.json",
    ):
        assert frag in md, frag
    row = art.quality_row(summary)
    assert list(row) == list(art.QUALITY_COLUMNS)
    assert row["scene"] == "a.tif" and row["nodata (%)"] == 42.1
    assert row["reconstruction RMSE (reflectance)"] == 0.0123
    col = "converged tiles (per stage; % of pixels with per-pixel stopping)"
    assert row[col] == "unmix 1/2"
    assert row["failed tiles"] == 1 and row["wall time (s)"] == 3.5
    summary.solver = {}
    assert art.quality_row(summary)[col].startswith("n/a")
    # per-pixel stopping (the unmixer): the converged pixels, summed over the tiles
    px = [
        {**st, "valid_pixels": 100, "converged_pixels": c}
        for st, c in zip(stats, (100, 97), strict=True)
    ]
    summary.solver = {"unmix": art.solver_summary(px)}
    assert art.quality_row(summary)[col] == "unmix 1/2 (98.5 % of pixels)"


def test_scene_progress_outside_a_run_only_logs(caplog) -> None:
    import logging

    p = art.scene_progress("a.tif", ["ingest", "denoise", "write"], logger=logging.getLogger("t"))
    assert p.artifact_id is None
    with caplog.at_level(logging.INFO, logger="t"):
        p.stage_done("ingest")
        p("denoise", 2, 4)
        p("denoise", 4, 4)
    assert p.percent == pytest.approx(66.7)
    assert "denoise 4/4 tiles" in caplog.text


# ------------------------------------------------------------------ a run directory of real files
def _real_run(root: Path, tif: Path) -> Path:
    """A finished run of the real 32 px EnMAP tile written with the pipeline's own functions:
    ingested scene, denoised and abundance stores, endmember spectra (real pixels, good bands
    only) and a run record (tile records: denoise converged, unmix stopped at its cap)."""
    import json

    import zarr

    from pipeline import provenance as prov
    from pipeline.ingest import ingest_scene, open_zarr_scene
    from pipeline.writers import create_output_zarr, mark_complete

    run = root / "enmap" / "r1"
    ingest_scene(tif, run / "ingest" / "scene.zarr", chunk=16)
    like = open_zarr_scene(run / "ingest" / "scene.zarr")
    cube = like.values
    wl, good = like["wavelength"].values, like["good_band"].values
    a = create_output_zarr(
        run / "denoised.zarr",
        "denoised",
        like,
        channel_dim="band",
        chunk=16,
        channel_coords={k: like[k].values for k in ("band", "wavelength", "fwhm", "good_band")},
    )
    zarr.open_array(a["denoised"], mode="r+")[...] = cube * 0.97
    mark_complete(run / "denoised.zarr")
    nir, red = cube[int(np.argmin(np.abs(wl - 860)))], cube[int(np.argmin(np.abs(wl - 660)))]
    veg = np.clip(((nir - red) / (nir + red) - 0.1) / 0.7, 0, 1)
    ab = np.stack([veg, (1 - veg) * 0.8, (1 - veg) * 0.2]).astype(np.float32)
    names = ["vegetation", "soil", "water"]
    a = create_output_zarr(
        run / "abundances.zarr",
        "abundances",
        like,
        channel_dim="endmember",
        chunk=16,
        channel_coords={"endmember": np.array(names, dtype=object)},
        extra=[("rmse", None, None)],
    )
    zarr.open_array(a["abundances"], mode="r+")[...] = ab
    zarr.open_array(a["rmse"], mode="r+")[...] = np.full(veg.shape, 0.0123456, np.float32)
    mark_complete(run / "abundances.zarr")
    flat = cube.reshape(cube.shape[0], -1)
    pix = [int(np.nanargmax(veg)), int(np.nanargmin(nir)), int(np.nanargmax(red))]
    keep = np.flatnonzero(good)
    (run / "endmembers.json").write_text(
        json.dumps(
            {
                "wavelength_nm": [float(w) for w in wl[keep]],
                "endmembers": {n: flat[keep, i].tolist() for n, i in zip(names, pix, strict=True)},
            }
        )
    )
    tiles = {
        "denoise": [
            {
                "key": f"t{i}",
                "status": "ok",
                "iterations": 6 + i,
                "residual": 4e-4,
                "converged": True,
            }
            for i in range(4)
        ],
        "unmix": [
            {
                "key": f"t{i}",
                "status": "ok",
                "iterations": 150,
                "residual": 2e-3,
                "converged": False,
            }
            for i in range(2)
        ],
    }
    prov.write_run_record(
        run,
        {
            "run_id": "r1",
            "status": "complete",
            "start": "2026-12-02T10:00:00Z",
            "end": "2026-12-02T10:01:00Z",
            "input": {"path": str(tif), "sha256": "ab" * 32},
            "config_hash": "cd" * 32,
            "config": {"tile": 16},
            "models": [{"name": "decsc", "weights_sha256": "ef" * 32, "halo": 8}],
            "outputs": {
                "denoised_zarr": {"path": "denoised.zarr", "sha256": "x"},
                "abundances_zarr": "abundances.zarr",
                "endmembers_json": "endmembers.json",
            },
            "tiles": tiles,
            "stages": {"ingest": {"wall_s": 0.51234}, "denoise": {"wall_s": 12.3456}},
            "failed_tiles": [],
        },
    )
    return run


def test_quicklooks_and_tables_of_a_real_run(
    tmp_path: Path, test_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _real_run(
        tmp_path / "out", test_data / "enmap_potsdam_tile" / "enmap_potsdam_tile_128_0.tif"
    )
    images = art.render_quicklooks(run)
    assert set(images) == {"before_rgb", "after_rgb", "abundances", "endmember_spectra"}
    sizes = {k: Image.open(io.BytesIO(v)).size for k, v in images.items()}
    assert all(min(w, h) >= 256 for w, h in sizes.values()), sizes  # the scene is 32 px
    assert (
        sizes["before_rgb"][0] == 256 and sizes["before_rgb"][1] >= 256 + ql.HEADER_PX
    )  # title above
    assert sizes["abundances"][0] > 3 * 256  # three labelled panels and the colour bar
    # the artifacts' images are the shared renderer's (pipeline.quicklooks), the abundances labelled
    # with the stored endmember names
    from pipeline.writers import open_output

    ab = open_output(run / "abundances.zarr", "abundances")
    assert images["abundances"] == ql.abundance_png(ab.values, ["vegetation", "soil", "water"])
    before = np.asarray(Image.open(io.BytesIO(images["before_rgb"])))
    assert before.shape[-1] == 4 and (before[-256:, :, 3] == 255).all()  # the tile has no nodata
    looks = art.write_quicklooks(run, images)
    assert {p.name for p in (run / "quicklooks").iterdir()} == {f"{k}.png" for k in images}

    s = art.summary_from_record(run)
    row = art.quality_row(s)
    assert row["converged tiles (per stage; % of pixels with per-pixel stopping)"] == (
        "denoise 4/4, unmix 0/2"
    )
    assert row["reconstruction RMSE (reflectance)"] == 0.0123
    assert row["denoise residual RMS (reflectance)"] == art._sig(
        row["denoise residual RMS (reflectance)"]
    )
    assert 0 < row["denoise residual RMS (reflectance)"] < 0.05
    assert row["wall time (s)"] == 12.9 and row["nodata (%)"] == 0.0
    assert s.outputs["denoised_zarr"] == str(run / "denoised.zarr")

    # publishing: the report embeds the PNGs; without an http address no image artifact is made
    # (Prefect's image artifact shows its URL as text), with one the artifact points at the file
    calls: list[tuple[str, Any]] = []
    import prefect.artifacts as pa

    for fn in ("create_markdown_artifact", "create_table_artifact", "create_image_artifact"):
        monkeypatch.setattr(
            pa, fn, lambda payload, *a, _fn=fn, **k: calls.append((_fn, payload)) or _fn
        )
    ids = art.publish_scene_artifacts(s, looks)
    assert set(ids) == {"report", "quality"} and [c[0] for c in calls][:2] == [
        "create_markdown_artifact",
        "create_table_artifact",
    ]
    md = calls[0][1]
    assert md.count("data:image/png;base64,") == 4 and art.SOLVER_NOTE in md
    assert calls[1][1] == [row]
    calls.clear()
    ids = art.publish_scene_artifacts(s, looks, image_base_url="https://data.example.org/hyperdeq/")
    urls = [c[1] for c in calls if c[0] == "create_image_artifact"]
    assert sorted(urls) == sorted(
        f"https://data.example.org/hyperdeq/r1/quicklooks/{k}.png" for k in images
    )
    with pytest.raises(ValueError, match=r"http\(s\)://"):
        art.publish_scene_artifacts(s, looks, image_base_url="file:///tmp")
