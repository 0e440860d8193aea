"""``hyperdeq run``: option contradictions are refused before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.errors import ConfigError

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "enmap_potsdam_mosaic_18tiles.tif"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--unmix", "3", "--no-unmix"], r"--unmix 3 and --no-unmix contradict each other"),
        (["--tile", "16", "--halo", "16"], r"halo 16 must be smaller than the tile 16"),
        (["--no-denoise", "--no-unmix"], r"nothing to do"),
        (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], r"not both"),
        (["--blend", "median"], r"unknown blend window 'median'"),
        # the full-size DECSC needs 512 MiB + ~160 kB per pixel on a CPU: a 160-px tile ~4.3 GiB before its halo
        (["--denoiser", "full", "--tile", "160"],
         r"160x160 px tile .*decsc 4418 MiB.*, over the per-tile memory budget of 3072\.0 MiB.*--tile-memory"),
        (["--denoiser", "full", "--tile-memory", "1000", "--tile", "64"], r"over the per-tile memory budget of 1000\.0 MiB"),
    ],
)
def test_contradictory_options_are_refused(tmp_path: Path, args: list[str], match: str) -> None:
    from flows.cli import app

    res = CliRunner().invoke(app, ["run", str(DEMO), "--out", str(tmp_path), *args])
    assert isinstance(res.exception, ConfigError), res.output
    assert not any(tmp_path.iterdir())  # nothing was written
    with pytest.raises(ConfigError, match=match):
        raise res.exception


def test_help_lists_the_options() -> None:
    from flows.cli import app

    res = CliRunner().invoke(app, ["run", "--help"])
    assert res.exit_code == 0
    for opt in ("--out", "--no-denoise", "--unmix", "--no-unmix", "--tile", "--halo", "--workers", "--scheduler"):
        assert opt in res.output
