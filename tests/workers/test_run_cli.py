"""``hyperdeq run``: option contradictions are refused before any work starts; one option table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.errors import ConfigError

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "enmap_potsdam_mosaic_18tiles.tif"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--endmembers", "3", "--no-unmix"], r"--endmembers 3 was given but unmixing is off"),
        (["--tile", "16", "--halo", "16"], r"halo 16 must be smaller than the tile 16"),
        (["--no-denoise", "--no-unmix"], r"nothing to do"),
        (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], r"not both"),
        (
            ["--cluster", "cuda", "--scheduler", "tcp://127.0.0.1:1"],
            r"or --cluster cuda .*not both",
        ),
        (["--blend", "median"], r"unknown blend window 'median'"),
        (["--endmembers", "1"], r"endmembers must be an integer >= 2"),
        (["--denoiser", "huge"], r"unknown denoiser 'huge'"),
        (
            ["--scheduler", "tcp://127.0.0.1:1"],
            r"cannot reach the Dask scheduler at 'tcp://127\.0\.0\.1:1'",
        ),
        # the full-size DECSC needs 512 MiB + ~160 kB per pixel on a CPU: the demo scene's 192x160 px
        # window (a 160-px tile plus its halo, clipped to the scene) is far over the default budget
        (
            ["--denoiser", "full", "--tile", "160"],
            r"192x160 px tile of 218 bands .*decsc \d+ MiB.*, over the per-tile memory budget of 3072\.0 MiB.*--tile-memory",
        ),
        (
            ["--denoiser", "full", "--tile-memory", "1000", "--tile", "64"],
            r"over the per-tile memory budget of 1000\.0 MiB",
        ),
        # endmembers are checked against the scene's good bands (from its header) before any work
        (
            ["--no-denoise", "--endmembers", "300"],
            r"--endmembers 300 is not below the scene's 218 good bands",
        ),
    ],
)
def test_contradictory_options_are_refused(tmp_path: Path, args: list[str], match: str) -> None:
    from flows.cli import app

    res = CliRunner().invoke(app, ["run", str(DEMO), "--out", str(tmp_path), *args])
    assert isinstance(res.exception, ConfigError), res.output
    assert not any(tmp_path.iterdir())  # nothing was written
    with pytest.raises(ConfigError, match=match):
        raise res.exception


def _help(args: list[str]) -> str:
    from flows.cli import app

    res = CliRunner().invoke(
        app, [*args, "--help"], terminal_width=250, env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"}
    )
    assert res.exit_code == 0, res.output
    return res.output


def _table_flags() -> set[str]:
    """Every flag the option table declares (both halves of an on/off pair)."""
    from flows.options import OPTIONS

    return {f for o in OPTIONS for f in o.cli_flag().split("/")}


def _command_flags(*path: str) -> set[str]:
    """The flags the click command at ``path`` accepts."""
    import typer.main

    from flows.cli import app

    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    return {f for p in cmd.params for f in (*p.opts, *p.secondary_opts) if f.startswith("--")}


def test_help_lists_the_options() -> None:
    out = _help(["run"])
    for opt in (
        "--out",
        "--no-denoise",
        "--unmix",
        "--no-unmix",
        "--endmembers",
        "--tile",
        "--halo",
        "--workers",
        "--scheduler",
        "--keep-tiles",
        "--batch",
        "--cluster",
        "--recipe",
    ):
        assert re.search(rf"{re.escape(opt)}\b", out), opt


def test_run_and_flow_run_share_every_option_of_the_table() -> None:
    """``hyperdeq run --help`` and ``hyperdeq flow run --help`` list the same options: every flag of
    the one table (flows/options.py), and nothing else apart from ``--out``."""
    table = _table_flags()
    assert {
        "--keep-tiles",
        "--no-keep-tiles",
        "--endmembers",
        "--batch",
        "--scheduler",
        "--allow-recipe-code",
        "--denoiser",
        "--guard",
        "--no-guard",
        "--subspace",
        "--unmix-epochs",
        "--tile-memory",
    } <= table
    run, flow = _command_flags("run"), _command_flags("flow", "run")
    assert run == flow == table | {"--out"}
    run_help, flow_help = _help(["run"]), _help(["flow", "run"])
    listed = {
        h: {f for f in table if re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", h)}
        for h in (run_help, flow_help)
    }
    assert listed[run_help] == listed[flow_help] == table
