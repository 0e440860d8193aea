"""``hyperdeq bench``: the performance harness (``python -m benchmarks``) as a CLI command."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Add ``hyperdeq bench``."""

    @app.command("bench")
    def bench(
        size: str = typer.Option(
            "default", help="smoke (< 60 s, CI) | default (< 15 min on 2 cores) | large"
        ),
        device: str = typer.Option(
            "cpu", help="cpu | cuda (GPU tables; skipped cleanly without CUDA)"
        ),
        out: Path = typer.Option(Path("docs/benchmarks.md"), help="markdown report to write"),
        json_path: Path | None = typer.Option(
            None,
            "--json",
            help="results JSON (default benchmarks/results/bench_<size>_<device>.json)",
        ),
        sections: str | None = typer.Option(
            None, help="comma list of sections to run (default: all)"
        ),
    ) -> None:
        """Measure speed, memory and scaling against the classical anchors; write docs/benchmarks.md."""
        import sys

        from flows.settings import REPO_ROOT
        from pipeline.errors import ConfigError

        if not (REPO_ROOT / "benchmarks" / "__main__.py").is_file():
            raise ConfigError(
                "hyperdeq bench runs from a source checkout (the benchmarks/ folder is not "
                f"installed with the package; none at {str(REPO_ROOT)!r}): clone the repository, "
                "`pip install -e .` there and run it again"
            )
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        from benchmarks.__main__ import run_bench

        secs = tuple(s.strip() for s in sections.split(",")) if sections else None
        run_bench(size, device, secs, json_path, out)
