"""Artifact rendering on a real EnMAP tile (no Prefect server needed)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows import artifacts as art


@pytest.fixture(scope="module")
def enmap_tile(test_data: Path):
    from pipeline.readers import open_scene

    return open_scene(test_data / "enmap_potsdam_tile" / "enmap_potsdam_tile_128_0.tif").load()


def test_artifact_keys_are_prefect_safe() -> None:
    assert art.artifact_key("hyperdeq", "ENMAP01_L2A.Spectral Image", "report") == \
        "hyperdeq-enmap01-l2a-spectral-image-report"
    assert art.artifact_key("--", "") == "hyperdeq"


def test_rgb_bands_pick_true_colour_good_bands(enmap_tile) -> None:
    wl = enmap_tile["wavelength"].values
    good = enmap_tile["good_band"].values
    r, g, b = art.rgb_bands(wl, enmap_tile.sizes["band"], good)
    assert abs(wl[r] - 640) < 10 and abs(wl[g] - 550) < 10 and abs(wl[b] - 460) < 10
    assert good[[r, g, b]].all()
    # without wavelengths: spread over the good bands
    assert len(set(art.rgb_bands(None, 10))) == 3


def test_rgb_png_marks_nodata_transparent(enmap_tile) -> None:
    cube = enmap_tile.values.copy()
    cube[:, :4, :] = np.nan  # a nodata strip
    bands = art.rgb_bands(enmap_tile["wavelength"].values, cube.shape[0], enmap_tile["good_band"].values)
    img = Image.open(io.BytesIO(art.rgb_png(cube, bands)))
    a = np.asarray(img)
    assert img.mode == "RGBA" and a.shape == (32, 32, 4)
    assert (a[:4, :, 3] == 0).all() and (a[4:, :, 3] == 255).all()
    assert a[4:, :, :3].std() > 10  # real image content, stretched


def test_abundance_png_and_data_uri() -> None:
    ab = np.stack([np.linspace(0, 1, 400).reshape(20, 20)] * 3)
    png = art.abundance_png(ab, gap=2)
    img = Image.open(io.BytesIO(png))
    assert img.size == (3 * 20 + 2 * 2, 20)
    uri = art.data_uri(png)
    assert uri.startswith("data:image/png;base64,")
    import base64

    assert base64.b64decode(uri.split(",", 1)[1]) == png


def test_quicklooks_are_downsampled() -> None:
    big = np.random.default_rng(0).random((3, 1000, 800)).astype(np.float32)
    img = Image.open(io.BytesIO(art.rgb_png(big, (0, 1, 2), max_side=200)))
    assert max(img.size) <= 200


def test_solver_summary_and_report() -> None:
    stats = [{"iterations": 5, "residual": 1e-4, "converged": True},
             {"iterations": 20, "residual": 3e-2, "converged": False}]
    s = art.solver_summary(stats)
    assert s["convergence_rate"] == 0.5 and s["not_converged"] == 1 and s["iterations_max"] == 20
    summary = art.SceneSummary(
        scene="/data/a.tif", out_dir="/o", record_path="/o/run.json", input_sha256="ab" * 32,
        config_hash="cd" * 32, config={"tile": 64, "halo": 16},
        models=[{"name": "deq-unmix", "weights_sha256": None, "halo": 16}],
        timings_s={"ingest": 1.0, "unmix": 2.5}, solver={"unmix": s},
        failed_tiles=[{"stage": "unmix", "index": "t_0_1", "error": "ModelError: diverged"}],
        outputs={"abundances_tif": "/o/abundances.tif"}, quality={"nodata_fraction": 0.42},
    )
    md = art.report_markdown(summary)
    for frag in ("# hyperdeq run: `a.tif`", "tile=64", "fitted per scene", "| **total** | **3.50** |",
                 "convergence_rate", "## Failed tiles (1)", "t_0_1: ModelError: diverged",
                 "/o/abundances.tif", "/o/run.json"):
        assert frag in md, frag
    row = art.quality_row(summary)
    assert row["scene"] == "a.tif" and row["nodata_fraction"] == 0.42
    assert row["failed_tiles"] == 1 and row["wall_s"] == 3.5


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
