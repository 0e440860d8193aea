"""An output root that is an existing file is refused with a clear error before any work, not a
NotADirectoryError traceback: ``confined_path`` raises WriteError, and a run refuses it at plan time
(ConfigError, before the input is hashed or a cluster starts)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.config import RunConfig
from pipeline.errors import ConfigError, WriteError
from pipeline.writers import confined_path
from tests.pipeline.test_tiles import write_crop_tif


def test_confined_path_refuses_a_file_as_folder(tmp_path: Path) -> None:
    f = tmp_path / "out"
    f.write_text("a previous log, not a folder")
    with pytest.raises(
        WriteError, match=r"output folder '.*out' exists but is a file, not a directory; choose"
    ):
        confined_path(f, "scene", "0123")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "scene").write_text("")
    with pytest.raises(WriteError, match=r"output folder '.*root/scene' exists but is a file"):
        confined_path(tmp_path / "root", "scene", "0123")
    assert (
        confined_path(tmp_path / "root", "other", "x.tif")
        == (tmp_path / "root" / "other" / "x.tif").resolve()
    )


def test_run_with_out_pointing_at_a_file(tmp_path: Path) -> None:
    from workers.infer import IdentityTileModel
    from workers.run import Job, run_scene

    scene = write_crop_tif(tmp_path / "crop.tif", 96, 64, 8, 8)  # real EnMAP block
    for out in (
        tmp_path / "out.txt",
        tmp_path / "out.txt" / "below",
    ):  # the root itself, or a folder under a file
        (tmp_path / "out.txt").write_text("")
        job = Job(RunConfig(out_root=out, tile=16, halo=2), unmix=None)
        with (
            ThreadPoolExecutor(1) as ex,
            pytest.raises(
                ConfigError,
                match=r"output folder '.*out\.txt.*' is under '.*out\.txt', which is a file; choose a folder",
            ),
        ):
            run_scene(scene, job, cluster=ex, tile_models={"denoise": IdentityTileModel()})
        assert (tmp_path / "out.txt").read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "crop.tif",
        "out.txt",
    ]  # nothing else written
