"""RunConfig, the model options, the job and the cluster spec: contradictions rejected at
construction, per-tile memory, automatic tile size, stable hash."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from workers.cluster import ClusterSpec
from workers.denoise.options import DenoiseOptions
from workers.run import Job
from workers.unmix.options import UnmixOptions

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "enmap_potsdam_mosaic_18tiles.tif"


def _build(**values: Any) -> Any:
    from flows.options import build

    return build(values)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: RunConfig(tile=0), r"tile must be a positive integer, got 0"),
        (lambda: RunConfig(tile=-8), r"tile must be a positive integer, got -8"),
        (lambda: RunConfig(halo=-1), r"halo must be an integer >= 0, got -1"),
        (lambda: RunConfig(tile=32, halo=32), r"halo 32 must be smaller than the tile 32"),
        (
            lambda: RunConfig(blend="gauss"),
            r"unknown blend window 'gauss'; choose one of \['hann', 'uniform', 'crop'\]",
        ),
        (lambda: Job(RunConfig(), denoise=None, unmix=None), r"nothing to do"),
        (
            lambda: _build(unmix=False, endmembers=4),
            r"--endmembers 4 was given but unmixing is off",
        ),
        (lambda: UnmixOptions(endmembers=1), r"endmembers must be an integer >= 2"),
        (
            lambda: ClusterSpec(n_workers=2, address="tcp://h:8786"),
            r"give either a scheduler address .* not both",
        ),
        (lambda: ClusterSpec(n_workers=0), r"n_workers must be a positive integer, got 0"),
        (
            lambda: ClusterSpec(kind="cuda", address="tcp://h:8786"),
            r"give either a scheduler address \('tcp://h:8786'\) or --cluster cuda .*not both",
        ),
        (
            lambda: ClusterSpec(address="tcp://h:8786", memory_limit="4GiB"),
            r"memory_limit='4GiB'\), not both",
        ),
        (lambda: RunConfig(device="tpu"), r"unknown device 'tpu'"),
        (lambda: RunConfig(batch_size=0), r"batch_size must be a positive integer, got 0"),
        (lambda: RunConfig(out_chunk=-4), r"out_chunk must be a positive integer or None, got -4"),
        (lambda: RunConfig(tile_memory_mb=0), r"tile_memory_mb must be > 0"),
        (lambda: UnmixOptions(epochs=0), r"unmix epochs must be a positive integer"),
        (lambda: ClusterSpec(address="  "), r"scheduler address is empty"),
        (lambda: DenoiseOptions(subspace=-1), r"subspace must be an integer from 0 \(off\) to 64"),
    ],
)
def test_contradictions_are_rejected_at_construction(make: Callable[[], Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make()


def _parts(job: Job, n_bands: int) -> dict[str, int]:
    """The models' part of a tile's memory for the job's largest read window."""
    rows, cols = job.config.read_window()
    return job.model_parts(rows, cols, n_bands)


def test_tile_over_memory_budget_is_rejected(tmp_path: Path) -> None:
    big = RunConfig(tile=512, halo=16, tile_memory_mb=1024)
    with pytest.raises(
        ConfigError,
        match=r"needs about \d+ MiB \(.*decsc.*\), over the per-tile memory budget of 1024",
    ):
        big.check_tile_memory(224, _parts(Job(big), 224))  # DECSC alone is over the budget
    no_denoise = Job(big, denoise=None)  # the band-dependent part
    assert _parts(no_denoise, 224) == {}
    with pytest.raises(
        ConfigError,
        match=r"needs about \d+ MiB \(io \d+ MiB\), over the per-tile memory budget of 1024",
    ):
        big.check_tile_memory(224, _parts(no_denoise, 224))
    small = RunConfig(tile=64, halo=16, tile_memory_mb=1024)
    small.check_tile_memory(224, _parts(Job(small), 224))
    # the plan refuses it before any work, on the scene's own bands and size
    from workers.run import plan_run

    with pytest.raises(
        ConfigError,
        match=r"a 192x160 px tile of 218 bands needs about \d+ MiB .*over the "
        r"per-tile memory budget of 1024",
    ):
        plan_run(DEMO, Job(big.replace(out_root=tmp_path)))
    assert not any(tmp_path.iterdir())


def test_tile_memory_estimate_counts_each_model_part() -> None:
    """DECSC's working memory grows with a tile's pixels, not its bands (measured by
    ``benchmarks.tile_memory``: ≈ 68 kB per pixel for the shipped model, ≈ 120–145 kB plus ~0.5 GB
    for the full-size one on a CPU); the subspace pass adds up to 8× the input; on a GPU device
    the model's part is device memory and not counted in the worker's RAM."""
    from workers.denoise.options import BYTES_PER_PIXEL, FIXED_BYTES

    base = RunConfig(tile=128, halo=16)
    parts = base.tile_memory_parts(218, _parts(Job(base), 218))
    px, inp = 160 * 160, 160 * 160 * 218 * 4
    assert parts == {
        "io": 12 * inp,
        "subspace": 8 * inp,
        "decsc": FIXED_BYTES["shipped"] + px * BYTES_PER_PIXEL["shipped"],
    }
    # above the measured peak of a 160-px tile of 218 bands (1.88 GB with the pass), within the default budget
    assert 1.88e9 < parts["decsc"] + parts["subspace"] and sum(parts.values()) < 3072 * 2**20
    base.check_tile_memory(218, _parts(Job(base), 218))
    assert _parts(Job(base, denoise=DenoiseOptions(subspace=0)), 218)["subspace"] == 0
    assert (
        sum(base.tile_memory_parts(218, _parts(Job(base, denoise=None), 218)).values()) == 12 * inp
    )
    full = Job(base, denoise=DenoiseOptions(arch="full"))
    assert _parts(full, 218)["decsc"] == 512 * 2**20 + px * 160_000
    with pytest.raises(
        ConfigError, match=r"decsc 4418 MiB.*over the per-tile memory budget of 3072"
    ):
        base.check_tile_memory(218, _parts(full, 218))
    big_budget = RunConfig(tile=128, halo=16, tile_memory_mb=8192)
    big_budget.check_tile_memory(218, _parts(full.replace(config=big_budget), 218))
    gpu = Job(RunConfig(tile=128, halo=16, device="cuda"), denoise=DenoiseOptions(arch="full"))
    gparts = gpu.config.tile_memory_parts(218, _parts(gpu, 218))
    assert gparts["decsc"] == 0 and sum(gparts.values()) < 3072 * 2**20
    # without a resolved halo the core alone is the read window (a lower bound)
    core = RunConfig(tile=160)
    with pytest.raises(ConfigError, match=r"160x160 px tile"):
        core.check_tile_memory(218, _parts(full.replace(config=core), 218))


def test_tile_left_unset_is_the_largest_that_fits_the_budget(tmp_path: Path) -> None:
    """``tile=None``: the plan picks the largest of AUTO_TILES whose tiles fit the memory budget
    on this scene (218 good bands); an explicit tile is kept as given."""
    from pipeline.config import AUTO_TILES
    from workers.run import plan_run

    for arch, want in (("shipped", 128), ("full", 80)):
        job = Job(RunConfig(out_root=tmp_path), denoise=DenoiseOptions(arch=arch), unmix=None)
        plan = plan_run(DEMO, job)
        assert plan.config.tile == want and plan.config.halo == 16
        hw = (192, 160)
        plan.config.check_tile_memory(218, job.model_parts(*plan.config.read_window(hw), 218), hw)
        bigger = [t for t in AUTO_TILES if t > want]
        for t in bigger:  # every larger candidate is over the budget
            cfg = plan.config.replace(tile=t)
            with pytest.raises(ConfigError, match="over the per-tile memory budget"):
                cfg.check_tile_memory(218, job.model_parts(*cfg.read_window(hw), 218), hw)
    explicit = plan_run(DEMO, Job(RunConfig(out_root=tmp_path, tile=48), unmix=None))
    assert explicit.config.tile == 48


def test_halo_defaults_to_the_largest_model_halo() -> None:
    cfg = RunConfig(tile=64)
    assert cfg.halo is None
    assert cfg.with_model_halos([16, 4]).halo == 16
    assert RunConfig(tile=64, halo=3).with_model_halos([16]).halo == 3  # explicit wins
    with pytest.raises(
        ConfigError, match=r"the models need a halo of 70 pixels, not smaller than the tile 64"
    ):
        cfg.with_model_halos([70])
    with pytest.raises(ConfigError, match=r"needs a resolved tile and halo"):
        cfg.config_hash()


def test_config_hash_is_stable_and_ignores_speed_only_fields() -> None:
    from workers.run import config_hash

    a = RunConfig(tile=64, halo=8)
    assert (
        a.config_hash()
        == RunConfig(
            tile=64, halo=8, batch_size=9, out_root="elsewhere", tile_memory_mb=100, keep_tiles=True
        ).config_hash()
    )
    assert a.config_hash() != RunConfig(tile=64, halo=8, blend="crop").config_hash()
    assert a.config_hash() != RunConfig(tile=64, halo=8, seed=1).config_hash()
    # the job's hash (the run id's) adds each enabled model's options: changing any is a new run
    job = Job(a)
    assert config_hash(job) == config_hash(Job(a.replace(batch_size=9, keep_tiles=True)))
    others = [
        Job(a, denoise=DenoiseOptions(guard=False)),
        Job(a, denoise=DenoiseOptions(subspace=0)),
        Job(a, denoise=DenoiseOptions(arch="full")),
        Job(a, unmix=UnmixOptions(endmembers=3)),
        Job(a, unmix=UnmixOptions(epochs=5)),
        Job(a, unmix=None),
        Job(a, denoise=None),
        Job(a.replace(blend="crop")),
    ]
    assert len({config_hash(job), *map(config_hash, others)}) == len(others) + 1
    # same value in a fresh interpreter (no dependence on hash randomisation or dict order)
    code = "from pipeline.config import RunConfig; print(RunConfig(tile=64, halo=8).config_hash())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == a.config_hash()


def test_config_is_frozen() -> None:
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.tile = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match="halo"):
        cfg.replace(tile=16, halo=20)
    for frozen in (DenoiseOptions(), UnmixOptions(), Job(), ClusterSpec()):
        with pytest.raises(AttributeError):
            frozen.seed = 3  # type: ignore[attr-defined]


def test_denoiser_choices_match_the_decsc_presets() -> None:
    """The options' list of denoisers is checked against the presets the model can build."""
    from workers.denoise.api import ARCH_PRESETS
    from workers.denoise.options import ARCHS

    assert sorted(ARCHS) == sorted(ARCH_PRESETS)


def test_plan_warns_when_an_explicit_halo_is_below_the_models(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An explicit --halo below DECSC's declared 16 px is allowed but said (its edge effect reaches
    further: tile borders can show); the models' own halo gives no warning."""
    import logging

    from workers.run import plan_run

    scene = tmp_path / "scene.tif"
    scene.write_bytes(b"not read by the plan beyond its sha256")
    with caplog.at_level(logging.WARNING, logger="hyperdeq.run"):
        plan = plan_run(
            scene,
            Job(RunConfig(out_root=tmp_path / "out", tile=64, halo=8), unmix=None),
            header=False,
        )
    assert plan.config.halo == 8
    assert any(
        "halo 8 px is smaller" in r.getMessage() and "decsc 16 px" in r.getMessage()
        for r in caplog.records
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hyperdeq.run"):
        plan = plan_run(
            scene, Job(RunConfig(out_root=tmp_path / "out", tile=64), unmix=None), header=False
        )
    assert plan.config.halo == 16
    assert not [r for r in caplog.records if "halo" in r.getMessage()]


def test_plan_refuses_an_unreadable_scene_before_any_work(tmp_path: Path) -> None:
    """With its header read (the default) the plan refuses input no reader understands."""
    from pipeline.errors import ReadError
    from workers.run import plan_run

    scene = tmp_path / "scene.tif"
    scene.write_bytes(b"not a GeoTIFF")
    with pytest.raises(ReadError, match=r"cannot open GeoTIFF .*scene\.tif.* corrupt or truncated"):
        plan_run(scene, Job(RunConfig(out_root=tmp_path / "out", tile=64), unmix=None))
    assert not (tmp_path / "out").exists()
