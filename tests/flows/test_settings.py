"""Flow parameter models reject contradictory options with messages that say what to change.

The run options are one table (``flows/options.py``): :data:`RunOptions` (the flows' parameter
model) builds a ``workers.run.Job`` and a ``workers.cluster.ClusterSpec``; what depends on the
scene (the tile memory check, paths) is checked by ``workers.run.plan_run`` before any work.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.options import RunOptions, options_to_build
from flows.settings import SweepParams
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
MOSAIC = ROOT / "tests" / "data" / "demo" / "enmap_potsdam_mosaic_18tiles.tif"


def test_run_options_defaults_map_to_the_job(tmp_path: Path) -> None:
    job, cluster = options_to_build(RunOptions(tile=64, endmembers=3), tmp_path)
    assert job.config.tile == 64 and job.unmix.endmembers == 3
    assert job.denoise is not None and job.unmix is not None  # both models on by default
    assert job.config.out_root == tmp_path
    assert job.denoise.arch == "shipped"
    assert (
        cluster.kind == "local" and cluster.n_workers is None
    )  # a local cluster of the default size
    job, _ = options_to_build(RunOptions(denoiser="full", device="cuda"), tmp_path)
    assert job.denoise.arch == "full" and job.config.device == "cuda"
    # the old flags map to the job's parts
    job, _ = options_to_build(
        RunOptions(unmix=False, subspace=0, guard=False, unmix_epochs=None), tmp_path
    )
    assert job.unmix is None and job.denoise.subspace == 0 and job.denoise.guard is False
    job, _ = options_to_build(
        RunOptions(denoise=False, unmix_epochs=5, batch=2, tile_memory=512.0), tmp_path
    )
    assert job.denoise is None and job.unmix.epochs == 5
    assert job.config.batch_size == 2 and job.config.tile_memory_mb == 512.0


def test_full_denoiser_tile_memory_is_checked_against_the_scene(tmp_path: Path) -> None:
    """On a CPU the full-size model's working memory (512 MiB + ~160 kB per pixel) needs a smaller
    tile or a larger budget; the check needs the scene's size and bands, so ``plan_run`` makes it
    (before any work)."""
    from workers.run import plan_run

    job, _ = options_to_build(RunOptions(denoiser="full", tile=160), tmp_path)
    with pytest.raises(ConfigError, match=r"over the per-tile memory budget of 3072"):
        plan_run(MOSAIC, job)
    job, _ = options_to_build(RunOptions(denoiser="full", tile=64), tmp_path)
    assert plan_run(MOSAIC, job).job.denoise.arch == "full"
    # left unset, the tile is the largest that fits the budget
    job, _ = options_to_build(RunOptions(denoiser="full"), tmp_path)
    assert plan_run(MOSAIC, job).config.tile < 128


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"denoise": False, "unmix": False}, "nothing to do"),
        ({"unmix": False, "endmembers": 3}, "unmixing is off"),
        ({"tile": 32, "halo": 32}, "halo 32 must be smaller than the tile 32"),
        ({"tile": 0}, "tile must be a positive integer"),
        ({"endmembers": 1}, "endmembers must be an integer >= 2"),
        ({"blend": "gauss"}, "hann"),
        ({"tiles": 3}, "Extra inputs"),
        ({"n_endmembers": 3}, "Extra inputs"),  # the old name is refused, not ignored
        ({"denoiser": "huge"}, "choose one of \\['shipped', 'full'\\]"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
    ],
)
def test_run_options_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        RunOptions(**kwargs)


def test_run_options_errors_surface_as_config_error() -> None:
    from flows.options import build, run_options

    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        run_options(device="tpu")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['n_endmembers'\]"):
        build({"n_endmembers": 3})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cluster": "address"}, "needs the scheduler address"),
        ({"cluster": "address", "scheduler": "tcp://h:8786", "workers": 2}, "not both"),
        ({"scheduler": "tcp://h:8786", "recipe": "local"}, "not both"),
        ({"scheduler": "  "}, "scheduler address is empty"),
        ({"recipe": "no-such-recipe"}, "does not exist"),
        ({"recipe": "gpu-dask-cuda"}, "is for kind='cuda' but kind='local'"),
        ({"workers": 0}, "n_workers must be a positive integer"),
        ({"cluster": "yarn"}, "unknown cluster kind 'yarn'"),
    ],
)
def test_cluster_options_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        RunOptions(**kwargs)


def test_scheduler_goes_to_the_cluster_spec(tmp_path: Path) -> None:
    _, cl = options_to_build(RunOptions(cluster="address", scheduler="tls://sched:8786"), tmp_path)
    assert cl.kind == "address" and cl.address == "tls://sched:8786"
    # a scheduler alone means "use it"; an address without protocol is tcp://
    _, cl = options_to_build(RunOptions(scheduler="h:8786"), tmp_path)
    assert cl.kind == "address" and cl.address == "tcp://h:8786"
    _, cl = options_to_build(RunOptions(workers=3, memory_limit="1GiB"), tmp_path)
    assert cl.kind == "local" and cl.cluster_kwargs()["n_workers"] == 3
    assert cl.cluster_kwargs()["memory_limit"] == "1GiB"
    # an unknown protocol is refused before any work (the CLI checks reachability first)
    _, cl = options_to_build(RunOptions(scheduler="http://h:8786"), tmp_path)
    with pytest.raises(ConfigError, match="unknown protocol"):
        cl.check_reachable()


def test_plan_checks_paths(tmp_path: Path, test_data: Path) -> None:
    """What the old SceneParams checked (scene exists, out_dir is a folder) ``plan_run`` checks."""
    from workers.run import plan_run

    scene = test_data / "enmap_potsdam_tile" / "enmap_potsdam_tile_128_0.tif"
    job, _ = options_to_build(RunOptions(), tmp_path / "out")
    plan = plan_run(scene, job)
    assert Path(plan.record_head()["input"]["path"]).is_absolute()
    assert plan.run_dir.parent.parent == tmp_path / "out"
    with pytest.raises(ConfigError, match="does not exist"):
        plan_run(tmp_path / "missing.tif", job)
    f = tmp_path / "file"
    f.write_text("x")
    job, _ = options_to_build(RunOptions(), f / "out")
    with pytest.raises(ConfigError, match="which is a file; choose a folder"):
        plan_run(scene, job)


def test_sweep_params_need_exactly_one_source() -> None:
    with pytest.raises(ValidationError, match="exactly one of"):
        SweepParams()
    with pytest.raises(ValidationError, match="exactly one of"):
        SweepParams(root="/a", list_file="/b")
    with pytest.raises(ValidationError, match="only apply to root scans"):
        SweepParams(list_file="/b", patterns=["*.tif"])
    with pytest.raises(ValidationError, match="greater than 0"):
        SweepParams(root="/a", max_concurrent=0)
    # the sweep's run options are the same model, validated the same way
    with pytest.raises(ValidationError, match="halo 40 must be smaller"):
        SweepParams(root="/a", options={"tile": 32, "halo": 40})
    assert SweepParams(root="/a", options={"tile": 32}).options.tile == 32


def test_flow_rejects_bad_parameters_before_any_work(tmp_path: Path) -> None:
    """Prefect validates flow parameters against the models (no server needed to fail)."""
    from flows.scene_flow import process_scene
    from flows.sweep import sweep_archive

    with pytest.raises(Exception, match="halo"):
        process_scene.validate_parameters(
            {"scene": "x.tif", "out_dir": str(tmp_path), "options": {"tile": 16, "halo": 20}}
        )
    ok = process_scene.validate_parameters(
        {"scene": "x.tif", "out_dir": str(tmp_path), "options": {"tile": 64, "workers": 1}}
    )
    assert ok["options"].tile == 64 and ok["options"].workers == 1
    # the cluster is part of the options: no separate `cluster` parameter any more
    with pytest.raises(Exception, match="cluster"):
        process_scene.validate_parameters({"scene": "x.tif", "cluster": {"n_workers": 1}})
    with pytest.raises(Exception, match="needs the scheduler address"):
        sweep_archive.validate_parameters({"root": "/a", "options": {"cluster": "address"}})


def test_parameter_schema_describes_every_option() -> None:
    """The deployment form: every field of ``options`` has a description (issue 23 item 8)."""
    from flows.options import OPTIONS
    from flows.scene_flow import process_scene
    from flows.sweep import sweep_archive

    for fl in (process_scene, sweep_archive):
        schema = fl.parameters.model_dump()
        defs = schema.get("definitions") or schema.get("$defs") or {}
        props = defs["RunOptions"]["properties"]
        assert set(props) == {o.name for o in OPTIONS}, fl.name
        missing = [k for k, v in props.items() if not str(v.get("description") or "").strip()]
        assert not missing, (fl.name, missing)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (
            ["flow", "run", "x.tif", "--tile", "16", "--halo", "16"],
            "halo 16 must be smaller than the tile 16",
        ),
        (["flow", "run", "x.tif", "--cluster", "address"], "needs the scheduler address"),
        (["flow", "run", "missing.tif"], "scene 'missing.tif' does not exist"),
        (["sweep", "--out", "o"], "exactly one of"),
        (
            ["sweep", "--list-file", "l.txt", "--tile", "16", "--halo", "16"],
            "halo 16 must be smaller",
        ),
        (["flow", "run", "x.tif", "--denoiser", "huge"], "unknown denoiser 'huge'"),
        (["demo", "--denoiser", "huge"], "unknown denoiser 'huge'"),
        (["run", "x.tif", "--no-denoise", "--no-unmix"], "nothing to do"),
        (["serve", "--sweep-root", "missing-archive"], "is not an existing folder"),
    ],
)
def test_cli_rejects_bad_options_with_clear_errors(
    args: list[str], match: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, args)
    assert isinstance(res.exception, ConfigError), res.output
    assert match in str(res.exception)
