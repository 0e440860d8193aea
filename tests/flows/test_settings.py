"""Flow parameter models reject contradictory options with messages that say what to change."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.settings import ClusterOptions, RunOptions, SceneParams, SweepParams
from pipeline.errors import ConfigError


def test_run_options_defaults_map_to_run_config(tmp_path: Path) -> None:
    cfg = RunOptions(tile=64, n_endmembers=3).to_run_config(tmp_path)
    assert cfg.tile == 64 and cfg.n_endmembers == 3 and cfg.denoise and cfg.unmix
    assert cfg.out_root == tmp_path
    assert cfg.denoise_arch == "shipped"
    assert RunOptions(denoise_arch="full", device="cuda").to_run_config(tmp_path).denoise_arch == "full"
    # on a CPU the full-size model's working memory (512 MiB + ~160 kB per pixel) needs a smaller tile or a larger budget
    with pytest.raises(ConfigError, match=r"over the per-tile memory budget of 3072"):
        RunOptions(denoise_arch="full", tile=160).to_run_config(tmp_path)
    assert RunOptions(denoise_arch="full", tile=64).to_run_config(tmp_path).denoise_arch == "full"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"denoise": False, "unmix": False}, "nothing to do"),
        ({"unmix": False, "n_endmembers": 3}, "unmix=False"),
        ({"tile": 32, "halo": 32}, "halo 32 must be smaller than tile 32"),
        ({"tile": 0}, "greater than 0"),
        ({"n_endmembers": 1}, "greater than or equal to 2"),
        ({"blend": "gauss"}, "hann"),
        ({"tiles": 3}, "Extra inputs"),
        ({"denoise_arch": "huge"}, "'shipped' or 'full'"),
    ],
)
def test_run_options_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        RunOptions(**kwargs)


def test_run_config_errors_surface_as_config_error(tmp_path: Path) -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        RunOptions(device="tpu").to_run_config(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "address"}, "needs address="),
        ({"address": "tcp://h:8786"}, "only used with kind='address'"),
        ({"kind": "address", "address": "h:8786"}, "needs a protocol"),
        ({"kind": "address", "address": "tcp://h:8786", "n_workers": 2}, "cannot be combined"),
        ({"recipe": "no-such-recipe"}, "does not exist"),
        ({"recipe": "gpu-dask-cuda"}, "is for kind='cuda' but kind='local'"),
    ],
)
def test_cluster_options_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        ClusterOptions(**kwargs)


def test_address_goes_to_run_config(tmp_path: Path) -> None:
    cl = ClusterOptions(kind="address", address="tls://sched:8786")
    assert RunOptions().to_run_config(tmp_path, cl).scheduler == "tls://sched:8786"
    assert RunOptions().to_run_config(tmp_path, ClusterOptions(n_workers=3)).workers == 3


def test_scene_params_checks_paths(tmp_path: Path, test_data: Path) -> None:
    scene = test_data / "enmap_potsdam_tile" / "enmap_potsdam_tile_128_0.tif"
    p = SceneParams(scene=str(scene), out_dir=str(tmp_path / "out"))
    assert Path(p.scene).is_absolute()
    with pytest.raises(ValidationError, match="does not exist"):
        SceneParams(scene=str(tmp_path / "missing.tif"), out_dir=str(tmp_path))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValidationError, match="is not a directory"):
        SceneParams(scene=str(scene), out_dir=str(f))


def test_sweep_params_need_exactly_one_source() -> None:
    with pytest.raises(ValidationError, match="exactly one of"):
        SweepParams()
    with pytest.raises(ValidationError, match="exactly one of"):
        SweepParams(root="/a", list_file="/b")
    with pytest.raises(ValidationError, match="only apply to root scans"):
        SweepParams(list_file="/b", patterns=["*.tif"])
    with pytest.raises(ValidationError, match="greater than 0"):
        SweepParams(root="/a", max_concurrent=0)


def test_flow_rejects_bad_parameters_before_any_work(tmp_path: Path) -> None:
    """Prefect validates flow parameters against the models (no server needed to fail)."""
    from flows.scene_flow import process_scene

    with pytest.raises(Exception, match="halo"):
        process_scene.validate_parameters(
            {"scene": "x.tif", "out_dir": str(tmp_path), "options": {"tile": 16, "halo": 20}}
        )
    ok = process_scene.validate_parameters(
        {"scene": "x.tif", "out_dir": str(tmp_path), "options": {"tile": 64}}
    )
    assert ok["options"].tile == 64


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["flow", "run", "x.tif", "--tile", "16", "--halo", "16"], "halo 16 must be smaller than tile 16"),
        (["flow", "run", "x.tif", "--cluster", "address"], "needs address="),
        (["flow", "run", "missing.tif"], "scene 'missing.tif' does not exist"),
        (["sweep", "--out", "o"], "exactly one of"),
        (["flow", "run", "x.tif", "--denoiser", "huge"], "'shipped' or 'full'"),
        (["demo", "--denoiser", "huge"], "'shipped' or 'full'"),
    ],
)
def test_cli_rejects_bad_options_with_clear_errors(args: list[str], match: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from flows.cli import app
    from pipeline.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, args)
    assert isinstance(res.exception, ConfigError), res.output
    assert match in str(res.exception)
