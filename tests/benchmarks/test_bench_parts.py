"""Fast checks of the benchmark building blocks (real demo data, no timings asserted)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.data import Crop, read_cube, write_crop, write_mirrored
from benchmarks.harness import Section, Target, _clean, fmt, md_table, section_markdown
from benchmarks.pipeline_bench import halo_table
from pipeline.errors import ConfigError


def test_mirrored_scene_is_real_pixels_flipped(tmp_path: Path) -> None:
    import rasterio

    base = Crop(0, 0, 16, 12, bands=5)
    p = write_mirrored(tmp_path / "m.tif", 4, base)
    with rasterio.open(p) as ds:
        big = ds.read()
        assert ds.tags(1)["wavelength"]  # band tags kept, so the reader finds wavelengths
    with rasterio.open(write_crop(tmp_path / "c.tif", base)) as ds:
        small = ds.read()
    assert big.shape == (5, 32, 24)
    np.testing.assert_array_equal(big[:, :16, :12], small)
    np.testing.assert_array_equal(big[:, :16, 12:], small[:, :, ::-1])
    np.testing.assert_array_equal(big[:, 16:, :12], small[:, ::-1, :])
    np.testing.assert_array_equal(big[:, 16:, 12:], small[:, ::-1, ::-1])


def test_crop_reader_keeps_good_bands_only() -> None:
    cube, wl = read_cube(Crop(0, 0, 8, 8))
    assert cube.shape == (218, 8, 8) and wl.shape == (218,)
    assert np.isfinite(cube).all()


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="square number"):
        write_mirrored(tmp_path / "x.tif", 3)
    with pytest.raises(ConfigError, match="leaves the 192×160 demo scene"):
        Crop(180, 0, 32, 32)


def test_halo_factor_falls_with_tile_size() -> None:
    f = [r[next(k for k in r if k.startswith("read px"))] for r in halo_table()]
    assert all(x > 1 for x in f) and f == sorted(f, reverse=True)
    assert f[1] == pytest.approx(1.498176)  # tile 128 + halo 16 on 1000×1000: the model-time floor


def test_markdown_and_json_cleaning() -> None:
    sec = Section(
        "k",
        "Title",
        tables={"t": [{"a": 1.23456, "b": None, "c": "x|y"}]},
        targets=[Target("ratio", 1.5, "≤ 1.3", False, "why")],
    )
    md = section_markdown(
        sec,
        {"command": "hyperdeq bench", "device": "cpu", "cpu": "CPU", "versions": {"torch": "t"}},
    )
    assert "| a | b | c |" in md and "x\\|y" in md and "MISSED" in md and "`hyperdeq bench`" in md
    assert _clean({"v": float("nan"), "w": [np.float32(2.0)]}) == {"v": None, "w": [2.0]}
    assert (
        fmt(float("inf")) == "–" and fmt(1234.5) == "1,234" and math.isclose(float(fmt(0.5)), 0.5)
    )
    assert md_table([]) == "_(no rows)_\n"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_unmix_seams_tiled_matches_whole_scene(tmp_path: Path) -> None:
    """DEQ-Unmix through the tile engine (real demo crop, 4 tiles) agrees with the whole-scene run.

    The fit's 3x3 net couples neighbouring pixels at every solver iteration, so tiles see their
    halo; with the spec's halo the blended abundances must match the whole-scene ones closely
    (the fit chooses the scaled mixing model on this crop: max abs error 0.024 with the uniform
    window, 1.2e-4 with the tapered ones, seam ratio 1.000: no seam).
    """
    import json

    from benchmarks.seams import main

    r = main(
        [
            "--model",
            "deq-unmix",
            "--crop",
            "48",
            "--tile",
            "24",
            "--epochs",
            "3",
            "--threads",
            "1",
            "--json",
            str(tmp_path / "s.json"),
            "--md",
            str(tmp_path / "s.md"),
        ]
    )
    assert json.loads((tmp_path / "s.json").read_text())["model"] == "deq-unmix"
    assert r["n_tiles"] == 4 and r["shape"][1:] == [48, 48]
    for window, v in r["windows"].items():
        assert v["max_abs_error"] < 0.03, (window, v)
        assert 0.9 < v["seam_ratio"] < 1.1, (window, v)
    assert "DEQ-Unmix" in (tmp_path / "s.md").read_text()
