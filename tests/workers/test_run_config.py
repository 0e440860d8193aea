"""RunConfig: contradictions rejected at construction, stable hash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import RunConfig
from pipeline.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile": 0}, r"tile must be a positive integer, got 0"),
        ({"tile": -8}, r"tile must be a positive integer, got -8"),
        ({"halo": -1}, r"halo must be an integer >= 0, got -1"),
        ({"tile": 32, "halo": 32}, r"halo 32 must be smaller than the tile 32"),
        ({"blend": "gauss"}, r"unknown blend window 'gauss'; choose one of \['hann', 'uniform', 'crop'\]"),
        ({"denoise": False, "unmix": False}, r"nothing to do"),
        ({"unmix": False, "n_endmembers": 4}, r"n_endmembers=4 was given but unmixing is off"),
        ({"n_endmembers": 1}, r"n_endmembers must be an integer >= 2"),
        ({"workers": 2, "scheduler": "tcp://h:8786"}, r"give either workers=2 .* not both"),
        ({"workers": 0}, r"workers must be a positive integer, got 0"),
        ({"device": "tpu"}, r"unknown device 'tpu'"),
        ({"batch_size": 0}, r"batch_size must be a positive integer, got 0"),
        ({"out_chunk": -4}, r"out_chunk must be a positive integer or None, got -4"),
        ({"tile_memory_mb": 0}, r"tile_memory_mb must be > 0"),
        ({"unmix_epochs": 0}, r"unmix_epochs must be a positive integer"),
        ({"scheduler": "  "}, r"scheduler address is empty"),
    ],
)
def test_contradictions_are_rejected_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig(**kwargs)


def test_tile_over_memory_budget_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"needs about \d+ MiB \(.*\), over the per-tile memory budget of 1024"):
        RunConfig(tile=512, halo=16, tile_memory_mb=1024)  # DECSC alone: refused at construction
    cfg = RunConfig(tile=512, halo=16, tile_memory_mb=1024, denoise=False)  # the band-dependent part
    with pytest.raises(ConfigError, match=r"needs about \d+ MiB \(io \d+ MiB\), over the per-tile memory budget of 1024"):
        cfg.check_tile_memory(224)
    RunConfig(tile=64, halo=16, tile_memory_mb=1024).check_tile_memory(224)


def test_tile_memory_estimate_counts_each_model_part() -> None:
    """DECSC's working memory grows with a tile's pixels, not its bands (measured by
    ``benchmarks.tile_memory``: ≈ 68 kB per pixel for the shipped model, ≈ 120–145 kB plus ~0.5 GB
    for the full-size one on a CPU); the subspace pass adds up to 8× the input; on a GPU device
    the model's part is device memory and not counted in the worker's RAM."""
    from pipeline.config import DECSC_BYTES_PER_PIXEL, DECSC_FIXED_BYTES

    base = RunConfig(tile=128, halo=16)
    parts = base.tile_memory_parts(218)
    px, inp = 160 * 160, 160 * 160 * 218 * 4
    assert parts == {"io": 12 * inp, "subspace": 8 * inp,
                     "decsc": DECSC_FIXED_BYTES["shipped"] + px * DECSC_BYTES_PER_PIXEL["shipped"]}
    # above the measured peak of a 160-px tile of 218 bands (1.88 GB with the pass), within the default budget
    assert 1.88e9 < parts["decsc"] + parts["subspace"] and base.estimate_tile_bytes(218) < 3072 * 2**20
    base.check_tile_memory(218)
    assert RunConfig(tile=128, halo=16, denoise_subspace=0).tile_memory_parts(218)["subspace"] == 0
    assert RunConfig(tile=128, halo=16, denoise=False).estimate_tile_bytes(218) == 12 * inp
    full = RunConfig(tile=128, halo=16, denoise_arch="full", tile_memory_mb=8192)
    assert full.tile_memory_parts(218)["decsc"] == 512 * 2**20 + px * 160_000
    with pytest.raises(ConfigError, match=r"decsc 4418 MiB.*over the per-tile memory budget of 3072"):
        RunConfig(tile=128, halo=16, denoise_arch="full")
    gpu = RunConfig(tile=128, halo=16, denoise_arch="full", device="cuda")
    assert gpu.tile_memory_parts(218)["decsc"] == 0 and gpu.estimate_tile_bytes(218) < 3072 * 2**20
    # without an explicit halo the core alone is checked at construction (a lower bound)
    with pytest.raises(ConfigError, match=r"160x160 px tile"):
        RunConfig(tile=160, denoise_arch="full")


def test_halo_defaults_to_the_largest_model_halo() -> None:
    cfg = RunConfig(tile=64)
    assert cfg.halo is None
    assert cfg.with_model_halos([16, 4]).halo == 16
    assert RunConfig(tile=64, halo=3).with_model_halos([16]).halo == 3  # explicit wins
    with pytest.raises(ConfigError, match=r"the models need a halo of 70 pixels, not smaller than the tile 64"):
        cfg.with_model_halos([70])
    with pytest.raises(ConfigError, match=r"needs a resolved halo"):
        cfg.config_hash()


def test_config_hash_is_stable_and_ignores_speed_only_fields() -> None:
    a = RunConfig(tile=64, halo=8)
    assert a.config_hash() == RunConfig(tile=64, halo=8, workers=7, batch_size=9, out_root="elsewhere").config_hash()
    assert a.config_hash() != RunConfig(tile=64, halo=8, blend="crop").config_hash()
    assert a.config_hash() != RunConfig(tile=64, halo=8, seed=1).config_hash()
    # same value in a fresh interpreter (no dependence on hash randomisation or dict order)
    code = "from pipeline.config import RunConfig; print(RunConfig(tile=64, halo=8).config_hash())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == a.config_hash()


def test_config_is_frozen() -> None:
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.tile = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match="halo"):
        cfg.replace(tile=16, halo=20)


def test_pipeline_denoiser_choices_match_the_decsc_presets() -> None:
    """pipeline.config cannot import workers (layering), so its list is checked against the presets."""
    from pipeline.config import DENOISE_ARCHS
    from workers.denoise.api import ARCH_PRESETS

    assert sorted(DENOISE_ARCHS) == sorted(ARCH_PRESETS)


def test_plan_warns_when_an_explicit_halo_is_below_the_models(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An explicit --halo below DECSC's declared 16 px is allowed but said (its edge effect reaches
    further: tile borders can show); the models' own halo gives no warning."""
    import logging

    from workers.run import plan_run

    scene = tmp_path / "scene.tif"
    scene.write_bytes(b"not read by the plan beyond its sha256")
    with caplog.at_level(logging.WARNING, logger="hyperdeq.run"):
        plan = plan_run(scene, tmp_path / "out", RunConfig(tile=64, halo=8, unmix=False))
    assert plan["config"].halo == 8
    assert any("halo 8 px is smaller" in r.getMessage() and "decsc 16 px" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hyperdeq.run"):
        plan_run(scene, tmp_path / "out", RunConfig(tile=64, unmix=False))
    assert not [r for r in caplog.records if "halo" in r.getMessage()]
