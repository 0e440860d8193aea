"""``hyperdeq eval denoiser``: DECSC against the classical anchors (protocol in docs/evaluation.md)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import typer

_ROOT = Path(__file__).resolve().parents[1]


def _default_data() -> Path:
    return Path(os.environ.get("HYPERDEQ_SHARED_DATA", _ROOT.parent / "shared" / "data"))


def _split(value: str) -> tuple[str, ...]:
    """Comma-separated list; commas inside ``band[0,55]`` brackets do not split."""
    items, depth, cur = [], 0, ""
    for ch in value:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        items.append(cur.strip())
    return tuple(items)


def _command_line(opts: dict[str, object]) -> str:
    """The exact command, rebuilt from the parsed options (also right under a test runner)."""
    parts = ["hyperdeq", "eval", "denoiser"]
    for key in (
        "data",
        "scenes",
        "cases",
        "baselines",
        "seed",
        "out",
        "json_out",
        "crop",
        "device",
        "threads",
        "cache",
        "weights",
    ):
        val = opts.get(key)
        if val is not None:
            flag = "--json" if key == "json_out" else f"--{key}"
            parts += [flag, shlex.quote(str(val))]
    if opts.get("arch", "shipped") != "shipped":
        parts += ["--arch", shlex.quote(str(opts["arch"]))]
    if not opts.get("decsc", True):
        parts.append("--no-decsc")
    if not opts.get("guard", True):
        parts.append("--no-guard")
    if opts.get("subspace", 8) != 8:
        parts += ["--subspace", str(int(opts["subspace"]))]
    return " ".join(parts)


def eval_denoiser(
    data: Path = typer.Option(
        None, help="shared data folder (default ../shared/data or $HYPERDEQ_SHARED_DATA)"
    ),
    scenes: str = typer.Option("jasper,pavia_centre", help="test scenes, comma-separated"),
    cases: str = typer.Option(
        "gauss30,gauss50,band[0,55],band[0,95],corr,mixture", help="noise cases, comma-separated"
    ),
    baselines: str = typer.Option(
        "fasthyde,l1hymixde,wsrrr,bm4d", help="classical anchors, comma-separated, or 'none'"
    ),
    seed: int = typer.Option(0, help="noise seed (a fresh generator per scene × case)"),
    out: Path = typer.Option(Path("docs/benchmarks/denoise_eval.md"), help="markdown report"),
    json_out: Path = typer.Option(
        Path("benchmarks/results/denoise_eval.json"), "--json", help="JSON result"
    ),
    crop: int = typer.Option(None, help="centre crop size in pixels, for a quick run"),
    decsc: bool = typer.Option(True, "--decsc/--no-decsc", help="evaluate the DECSC model"),
    device: str = typer.Option("cpu", help="torch device for DECSC"),
    threads: int = typer.Option(None, help="torch threads (default: torch's choice)"),
    cache: Path = typer.Option(
        None, help="JSON cache of baseline results (keyed by noisy-cube sha256 and versions)"
    ),
    weights: Path = typer.Option(None, help="DECSC weights file other than the shipped one"),
    arch: str = typer.Option("shipped", help="architecture of --weights: shipped or full"),
    guard: bool = typer.Option(
        True, "--guard/--no-guard", help="DECSC's band guard (on in the pipeline)"
    ),
    subspace: int = typer.Option(
        8,
        "--subspace",
        help="DECSC's spectral-subspace pass dimension, 0: the model alone (8 in the pipeline)",
    ),
) -> None:
    """Score DECSC and the classical denoisers on the test scenes under every noise case."""
    from workers.denoise.evaluate import EvalConfig, run_eval, write_report

    data = data or _default_data()
    names = _split(baselines)
    config = EvalConfig(
        data=data,
        scenes=_split(scenes),
        cases=_split(cases),
        baselines=() if names == ("none",) else names,
        seed=seed,
        crop=crop,
        decsc=decsc,
        device=device,
        threads=threads,
        cache=cache,
        weights=weights,
        arch=arch,
        guard=guard,
        subspace=subspace,
        command=_command_line(locals()),
    )
    res = run_eval(
        config,
        progress=lambda msg: typer.echo(msg, err=True),
        on_result=lambda partial: write_report(partial, out, json_out),
    )
    write_report(res, out, json_out)
    for v in res["verdict"]:
        typer.echo(
            f"{v['scene']:>13} {v['case']:<11} decsc {v['decsc_mpsnr_db']} "
            f"best anchor {v['best_anchor']} {v['best_anchor_mpsnr_db']} -> {v['status']}"
        )
    typer.echo(f"wrote {out} and {json_out}")


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Add ``eval denoiser`` to the ``eval`` group."""
    groups["eval"].command("denoiser")(eval_denoiser)
