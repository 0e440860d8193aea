"""The ``hyperdeq`` command line.

Each area registers its commands from its own module (``flows/cli_*.py``) so that the modules
stay independent; heavy imports happen inside the command functions, so ``hyperdeq --help`` is
fast.
"""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    name="hyperdeq",
    help=(
        "hyperdeq: denoise (DECSC) and unmix (DEQ-Unmix) large hyperspectral scenes, "
        "tile by tile on a Dask cluster, orchestrated by Prefect."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Train the models.", no_args_is_help=True)
eval_app = typer.Typer(
    help="Evaluate the models against classical baselines (protocol in docs).", no_args_is_help=True
)
flow_app = typer.Typer(help="Run the pipeline through Prefect.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
app.add_typer(flow_app, name="flow")

GROUPS = {"train": train_app, "eval": eval_app, "flow": flow_app}

# one module per area; each defines ``register(app, groups)``
_AREAS = [
    "cli_io",
    "cli_denoise",
    "cli_denoise_eval",
    "cli_unmix",
    "cli_run",
    "cli_flow",
    "cli_bench",
]
for _name in _AREAS:
    _mod = importlib.import_module(f"flows.{_name}")
    _mod.register(app, GROUPS)


def _crash_report(exc: BaseException) -> str:
    """Write the traceback of an unexpected error to a file; return its path."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="hyperdeq-crash-", suffix=".txt")
    with open(fd, "w") as fh:
        fh.write("".join(traceback.format_exception(exc)))
    return path


def main() -> None:
    """Console-script entry point: hyperdeq errors become one clear line and exit code 2; a stop
    (Ctrl-C) exits 130; anything else is a bug: one line, the traceback in a file, exit 1
    (``HYPERDEQ_TRACEBACK=1`` prints it instead)."""
    import os

    from pipeline.errors import HyperdeqError

    try:
        app()
    except HyperdeqError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho(
            "stopped (Ctrl-C); rerun the same command to resume", fg=typer.colors.YELLOW, err=True
        )
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("HYPERDEQ_TRACEBACK"):
            raise
        path = _crash_report(exc)
        typer.secho(
            f"error: unexpected {type(exc).__name__}: {str(exc)[:500]}. This is a bug in hyperdeq, not in "
            f"your input: the traceback is in {path}; please report it (HYPERDEQ_TRACEBACK=1 prints it)",
            fg=typer.colors.RED,
            err=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
