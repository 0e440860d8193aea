"""An output root that is an existing file is a WriteError before any work, not a NotADirectoryError traceback."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.config import RunConfig
from pipeline.errors import WriteError
from pipeline.writers import confined_path
from tests.pipeline.test_tiles import write_crop_tif


def test_confined_path_refuses_a_file_as_folder(tmp_path: Path) -> None:
    f = tmp_path / "out"
    f.write_text("a previous log, not a folder")
    with pytest.raises(WriteError, match=r"output folder '.*out' exists but is a file, not a directory; choose"):
        confined_path(f, "scene", "0123")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "scene").write_text("")
    with pytest.raises(WriteError, match=r"output folder '.*root/scene' exists but is a file"):
        confined_path(tmp_path / "root", "scene", "0123")
    assert confined_path(tmp_path / "root", "other", "x.tif") == (tmp_path / "root" / "other" / "x.tif").resolve()


def test_run_with_out_pointing_at_a_file(tmp_path: Path) -> None:
    from workers.infer import IdentityTileModel
    from workers.run import run_scene

    scene = write_crop_tif(tmp_path / "crop.tif", 96, 64, 8, 8)  # real EnMAP block
    out = tmp_path / "out.txt"
    out.write_text("")
    with ThreadPoolExecutor(1) as ex, pytest.raises(WriteError, match=r"exists but is a file"):
        run_scene(scene, out, RunConfig(tile=16, halo=2, unmix=False), client=ex, denoise_model=IdentityTileModel())
    assert out.read_text() == ""
