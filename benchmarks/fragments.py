"""The benchmark modules other areas own, reused as they are (never rewritten here).

Each writes ``benchmarks/results/<name>.json`` and ``docs/benchmarks/<name>.md`` when run as
``python -m benchmarks.<name>``. ``hyperdeq bench`` includes their committed results, and in the
``default``/``large`` sizes also runs a small version of each in a child process (arguments
below, output kept in a temporary folder so the committed results are not overwritten) with a
time limit. A module that does not exist yet is reported as missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, Section


@dataclass(frozen=True)
class Fragment:
    name: str
    what: str
    doc: str
    #: arguments of a small run; ``{tmp}`` is a temporary folder. None: include committed results only
    small_args: tuple[str, ...] | None
    timeout_s: int = 420


FRAGMENTS: tuple[Fragment, ...] = (
    Fragment(
        "ingest",
        "ingest peak RSS and throughput vs plain read-and-write",
        "ingest.md",
        ("--reps", "2", "--small-reps", "0", "--tmpdir", "{tmp}", "--no-write"),
    ),
    Fragment("seams", "seam error: tiled-and-blended vs whole-scene output", "seams.md", None),
    Fragment(
        "deq_memory",
        "DECSC training peak memory, implicit vs unrolled, 10/20/40 iterations",
        "deq_memory.md",
        None,
    ),
    Fragment(
        "unmix_memory",
        "DEQ-Unmix training peak memory, implicit vs unrolled, 10/20/40 iterations",
        "unmix.md",
        (
            "--scene",
            "crop",
            "--iters",
            "10,20,40",
            "--batch",
            "2",
            "--size",
            "32",
            "--out",
            "{tmp}/unmix_memory.json",
            "--md",
            "{tmp}/unmix.md",
        ),
    ),
    Fragment(
        "tile_memory",
        "DECSC per-tile peak RSS vs the pipeline's per-tile memory estimate",
        "tile_memory.md",
        None,
    ),
)


def _exists(name: str) -> bool:
    return importlib.util.find_spec(f"benchmarks.{name}") is not None


def committed(name: str) -> dict[str, Any] | None:
    p = ROOT / "benchmarks" / "results" / f"{name}.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        return None


def docs_for(fr: Fragment) -> list[Path]:
    """The fragment's markdown files under docs/benchmarks (its declared one, else by name)."""
    d = ROOT / "docs" / "benchmarks"
    hits = [d / fr.doc] if (d / fr.doc).is_file() else []
    hits += [p for p in sorted(d.glob(f"{fr.name}*.md")) if p not in hits]
    return hits


def _json_blocks(text: str) -> list[dict[str, Any]]:
    """JSON objects printed one per block (a line "{" to a line "}") in a module's stdout."""
    blocks, cur = [], None
    for ln in text.splitlines():
        if ln == "{":
            cur = [ln]
        elif cur is not None:
            cur.append(ln)
            if ln == "}":
                try:
                    blocks.append(json.loads("\n".join(cur)))
                except ValueError:
                    pass
                cur = None
    return blocks


def _small_run(fr: Fragment) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"hyperdeq-bench-{fr.name}-") as td:
        args = [a.replace("{tmp}", td) for a in (fr.small_args or ())]
        cmd = [sys.executable, "-m", f"benchmarks.{fr.name}", *args]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(
                cmd,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=fr.timeout_s,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "timeout_s": fr.timeout_s, "command": " ".join(cmd[1:])}
        out: dict[str, Any] = {
            "status": "ok" if p.returncode == 0 else f"rc={p.returncode}",
            "wall_s": time.perf_counter() - t0,
            "command": "python " + " ".join(cmd[1:]).replace(td, "<tmp>"),
        }
        for j in Path(td).glob("*.json"):
            try:
                out["result"] = json.loads(j.read_text())
            except ValueError:
                pass
        if "result" not in out:
            blocks = _json_blocks(p.stdout)
            if blocks:
                out["result"] = {"runs": blocks}
            else:
                out["stdout_tail"] = p.stdout[-3000:]
        if p.returncode != 0:
            out["stderr_tail"] = p.stderr[-1500:]
        return out


def _ingest_rows(res: dict[str, Any] | None, source: str) -> list[dict[str, Any]]:
    """Key figures of an ingest.json payload (tolerant to missing keys: it is another area's format)."""
    rows = []
    for r in (res or {}).get("runs", []) if isinstance(res, dict) else []:
        try:
            rows.append(
                {
                    "source": source,
                    "scene": "×".join(map(str, r["source"]["shape"])),
                    "plain read+write MiB/s": r.get("baseline_throughput_mib_s"),
                    "ingest MiB/s": r.get("ingest_throughput_mib_s"),
                    "ingest ÷ plain time": r.get("ingest_over_baseline_time"),
                    "plain peak RSS MiB": r.get("baseline", {}).get("peak_rss_mib"),
                    "ingest peak RSS MiB": r.get("ingest", {}).get("peak_rss_mib"),
                }
            )
        except (KeyError, TypeError):
            continue
    return rows


def run(sec: Section, plan: Any, device: str) -> None:
    rows = []
    for fr in FRAGMENTS:
        present = _exists(fr.name)
        res = committed(fr.name)
        docs = docs_for(fr)
        row: dict[str, Any] = {
            "benchmark": f"benchmarks/{fr.name}.py",
            "measures": fr.what,
            "module": "present" if present else "missing",
            "committed results": f"benchmarks/results/{fr.name}.json" if res else "none yet",
            "report": ", ".join(f"docs/benchmarks/{p.name}" for p in docs) or "none yet",
            "results date": (res or {}).get("date_utc") or (res or {}).get("date"),
        }
        sec.values[f"{fr.name}_committed"] = res
        if present and plan.run_fragments and fr.small_args is not None and device == "cpu":
            small = _small_run(fr)
            sec.values[f"{fr.name}_small_run"] = small
            row["small run here"] = (
                f"{small['status']} ({small.get('wall_s', 0):.0f} s): `{small['command']}`"
            )
        else:
            row["small run here"] = "not in this size" if present else "module missing"
        rows.append(row)
    sec.tables["Benchmarks owned by other areas (reused)"] = rows
    sec.values["fragments_present"] = sum(r["module"] == "present" for r in rows)
    ingest_rows = _ingest_rows(
        sec.values.get("ingest_committed"), "committed (benchmarks/results/ingest.json)"
    )
    small = (sec.values.get("ingest_small_run") or {}).get("result")
    ingest_rows += _ingest_rows(small, "small run in this bench")
    if ingest_rows:
        sec.tables["Ingest vs plain read-and-write (from benchmarks/ingest.py)"] = ingest_rows
    for fr in FRAGMENTS:  # modules that report a flat list of rows (training memory, seams)
        for label, res in (
            ("committed", sec.values.get(f"{fr.name}_committed")),
            (
                "small run in this bench",
                (sec.values.get(f"{fr.name}_small_run") or {}).get("result"),
            ),
        ):
            rows_ = res.get("rows") if isinstance(res, dict) else None
            if isinstance(rows_, list) and rows_ and all(isinstance(r, dict) for r in rows_):
                flat = [
                    {
                        k: v
                        for k, v in r.items()
                        if isinstance(v, int | float | str | bool) or v is None
                    }
                    for r in rows_
                ]
                sec.tables[f"benchmarks/{fr.name}.py: {label} ({res.get('command', '')})"] = flat
    sec.notes.append(
        "Their full reports are included at the end of this document (Appendix), as committed."
    )
