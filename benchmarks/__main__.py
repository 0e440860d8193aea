"""``python -m benchmarks`` (= ``hyperdeq bench``): speed, memory and scaling against the anchors.

One run measures every section (see :data:`SECTIONS`) and writes
``benchmarks/results/bench_<size>_<device>.json`` plus the markdown report (default
``docs/benchmarks.md``), which assembles this run with the other committed bench runs (other
sizes or devices) and includes the reports of the benchmark modules other areas own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    DEVICES,
    RESULTS_DIR,
    ROOT,
    SIZES,
    Section,
    check_choice,
    environment,
    load_average,
    md_table,
    run_section,
    section_markdown,
    write_json,
)

DOC = ROOT / "docs" / "benchmarks.md"

#: key, title, module:function(section, plan, device)
SECTIONS: tuple[tuple[str, str, str], ...] = (
    (
        "cli_vs_fasthyde",
        "hyperdeq run --no-unmix (CLI defaults, fresh process) vs FastHyDe, same cube",
        "cli_vs_fasthyde:run",
    ),
    ("throughput", "Model throughput, FLOPs per voxel, achieved vs peak", "throughput:run"),
    ("overhead", "Pipeline overhead ratio and where the time goes", "pipeline_bench:overhead"),
    ("scaling", "Scaling: 2 workers ÷ 1 worker (model stage)", "pipeline_bench:scaling"),
    ("memory", "Memory: peak RSS per worker at 1×, 4×, 16× (and 36×) the scene area", "memory:run"),
    ("solver", "DEQ solver: iterations per tile, cold vs warm start", "solver:run"),
    (
        "fragments",
        "Seams, training memory, ingest (benchmarks owned by other areas)",
        "fragments:run",
    ),
    ("gpu", "GPU", "gpu:run"),
)
SECTION_KEYS = tuple(k for k, _, _ in SECTIONS)


def _busy(pl: dict[str, Any]) -> bool:
    """Whether other jobs loaded the machine: 1-min load average above 1 when the run started
    (the load at the end includes the benchmark's own processes)."""
    la = pl.get("environment", {}).get("load_average_at_start")
    return bool(la and la[0] > 1.0)


def _fn(spec: str) -> Callable[[Section, Any, str], None]:
    import importlib

    mod, fn = spec.split(":")
    return getattr(importlib.import_module(f"benchmarks.{mod}"), fn)


def run_bench(
    size: str = "default",
    device: str = "cpu",
    sections: tuple[str, ...] | None = None,
    json_path: Path | None = None,
    out: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark sections; write the JSON and the markdown report; return the payload."""
    from benchmarks.plan import get_plan
    from pipeline.errors import ConfigError

    check_choice("size", size, SIZES)
    check_choice("device", device, DEVICES)
    chosen = sections or SECTION_KEYS
    bad = [s for s in chosen if s not in SECTION_KEYS]
    if bad:
        raise ConfigError(f"unknown benchmark sections {bad!r}; choose from {list(SECTION_KEYS)!r}")
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    plan = get_plan(size)
    env = environment(device)
    if device == "cuda" and env["gpu"] is None:
        log(
            "[bench] --device cuda but no CUDA device: model sections run on CPU are skipped; GPU section says so"
        )
    t0 = time.perf_counter()
    secs: list[Section] = []
    json_path = json_path or RESULTS_DIR / f"bench_{size}_{device}.json"
    payload: dict[str, Any] = {}
    for key, title, spec in SECTIONS:
        if key not in chosen:
            continue
        if device == "cuda" and env["gpu"] is None and key != "gpu":
            s = Section(
                key=key, title=title, status="skipped", notes=["no CUDA device: nothing measured"]
            )
        else:
            s = run_section(key, title, lambda sec, spec=spec: _fn(spec)(sec, plan, device), log)
        secs.append(s)
        payload = _save(
            json_path, size, device, plan, env, secs, t0, sections
        )  # after every section
    env["load_average_at_end"] = load_average()
    payload = _save(json_path, size, device, plan, env, secs, t0, sections)
    out = out or DOC
    others = (
        _other_runs(json_path, size) if json_path.parent.resolve() == RESULTS_DIR.resolve() else []
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report([payload, *others]))
    log(f"[bench] wrote {json_path} and {out} in {payload['wall_s']:.0f} s")
    return payload


def _save(
    json_path: Path,
    size: str,
    device: str,
    plan: Any,
    env: dict[str, Any],
    secs: list[Section],
    t0: float,
    sections: tuple[str, ...] | None,
) -> dict[str, Any]:
    """Write the results so far (a partial rerun updates those sections of the last full run)."""
    payload = {
        "size": size,
        "device": device,
        "plan": _plan_dict(plan),
        "environment": env,
        "wall_s": time.perf_counter() - t0,
        "sections": {s.key: {**s.to_dict(), "environment": env} for s in secs},
    }
    if sections and json_path.is_file():
        old = json.loads(json_path.read_text())
        if old.get("size") == size and old.get("device") == device:
            merged = dict(old["sections"])
            merged.update(payload["sections"])
            payload["sections"] = {k: merged[k] for k in SECTION_KEYS if k in merged}
    write_json(json_path, payload)
    return payload


def _plan_dict(plan: Any) -> dict[str, Any]:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(plan), default=str))


def _other_runs(this: Path, size: str) -> list[dict[str, Any]]:
    """Other committed bench runs to show beside this one (smoke runs only beside smoke)."""
    out = []
    for p in sorted(RESULTS_DIR.glob("bench_*_*.json")):
        if p.resolve() == this.resolve() or ("smoke" in p.name) != (size == "smoke"):
            continue
        try:
            out.append(json.loads(p.read_text()))
        except ValueError:
            continue
    return out


# ---------------------------------------------------------------------------- report
def _targets_table(payloads: list[dict[str, Any]]) -> str:
    rows = []
    for pl in payloads:
        for s in pl["sections"].values():
            for t in s.get("targets", []):
                rows.append(
                    {
                        "run": f"{pl['size']}/{pl['device']}",
                        "section": s["title"],
                        "target": t["name"],
                        "measured": t["value"],
                        "goal": t["goal"],
                        "met": {True: "met", False: "MISSED", None: "n/a"}[t["met"]],
                        "why / caveat": t["why"],
                    }
                )
    return md_table(rows)


def findings(pl: dict[str, Any]) -> list[str]:
    """Plain-language bullets derived from one run's measured values (nothing hand-entered)."""
    from benchmarks.pipeline_bench import halo_table

    tag = f"[{pl['size']}/{pl['device']}" + (f", {pl['caveat']}]" if pl.get("caveat") else "]")
    s = {k: v for k, v in pl["sections"].items() if v.get("status") == "ok"}
    out: list[str] = []
    missing = [k for k in SECTION_KEYS if k not in pl["sections"]]
    if missing:
        out.append(
            f"{tag} Not measured in this run (did not finish before the results were committed, or not "
            f"selected): {', '.join(missing)}."
        )
    la = pl["environment"].get("load_average_at_start")
    if la and la[0] > (pl["environment"].get("cpu_cores") or 1):
        out.append(
            f"{tag} The machine was oversubscribed while measuring (load average {la[0]} on "
            f"{pl['environment'].get('cpu_cores')} cores): absolute seconds and MVox/s are pessimistic and "
            "noisy; ratios measured back to back are the figures to compare."
        )
    v = s.get("throughput", {}).get("values", {})
    if v:
        w = v.get("decsc_weights", "")
        out.append(
            f"{tag} DECSC runs at {v.get('decsc_mvox_s', float('nan')):.4f} MVox/s and DEQ-Unmix at "
            f"{v.get('unmix_mvox_s', float('nan')):.4f} MVox/s on this CPU (weights: {w}); see the table for "
            "the classical anchors on the same pixels and the fraction of measured matmul peak reached."
        )
    v = s.get("overhead", {}).get("values", {})
    if v:
        floors = {
            r["tile"]: next(x for k, x in r.items() if k.startswith("read px"))
            for r in halo_table()
        }
        out.append(
            f"{tag} Overhead ratio {v['overhead_ratio']:.2f}; this run's tiles read ×{v['halo_factor']:.2f} the "
            f"pixels they own (halo recompute), so the ratio cannot go below that with a per-pixel-cost model. "
            f"On a 1000×1000 scene with halo 16 that floor is {floors[128]:.2f} at tile 128 and {floors[256]:.2f} "
            f"at tile 256: the ≤ 1.3 goal needs tiles of 256 px or more (or a smaller halo, if the seam "
            "benchmark allows it)."
        )
    v = s.get("scaling", {}).get("values", {})
    if v:
        out.append(
            f"{tag} Two workers deliver ×{v['scaling_2_over_1']:.2f} the model-stage throughput of one "
            "(goal ≥ 1.7 on 2 cores); the scheduler, the driver and tile I/O share those cores"
            + (", and other jobs were running (see the load average)." if _busy(pl) else ".")
        )
    v = s.get("memory", {}).get("values", {})
    if v:
        out.append(
            f"{tag} Peak worker RSS across the area steps: "
            + ", ".join(f"{x:.0f}" for x in v.get("worker_peak_mib", []))
            + " MiB "
            f"(highest ÷ smallest scene ×{v['worker_peak_growth']:.2f}; driver "
            + ", ".join(f"{x:.0f}" for x in v.get("driver_peak_mib", []))
            + f" MiB, ×{v['driver_peak_growth']:.2f})."
        )
    v = s.get("solver", {}).get("values", {})
    if v and "warm_iterations_mean" in v:
        out.append(
            f"{tag} DEQ solver: {v['cold_iterations_mean']:.1f} iterations per tile from a cold start vs "
            f"{v['warm_iterations_mean']:.1f} with the best warm start ({v['warm_best']}), same tolerance; converged "
            f"{v.get('cold_converged')} cold vs {v.get('warm_converged')} warm, worst residual "
            f"{v.get('cold_residual_max', float('nan')):.2e} vs {v.get('warm_residual_max', float('nan')):.2e}."
        )
    g = s.get("gpu", {})
    if g.get("values", {}).get("gpu"):
        tabs = g.get("tables", {})
        main = next(iter(tabs.get(f"GPU: {g['values']['gpu']}", [])), {})
        fl = next(iter(tabs.get("GPU FLOPs per voxel and achieved vs peak", [])), {})
        peak32 = next(
            (
                r["TFLOP/s"]
                for r in tabs.get("GPU peak estimate (measured matmul)", [])
                if "float32" in r.get("matmul", "")
            ),
            float("nan"),
        )
        # achieved at the best tile size: FLOP/voxel × voxels/s ÷ the measured fp32 peak
        best_pct = (
            100
            * fl.get("FLOP/voxel", float("nan"))
            * main.get("best mvox_s (any tile)", float("nan"))
            * 1e6
            / (peak32 * 1e12)
        )
        line = (
            f"{tag} On the {g['values']['gpu']}: DECSC reaches {main.get('best mvox_s (any tile)', float('nan')):.2f} MVox/s "
            f"at its best tile size (a 1000×1000×224 scene ≈ {main.get('est. 1000×1000×224 scene s', float('nan')):.0f} s), "
            f"{best_pct:.1f} % of the measured float32 matmul peak there ({fl.get('% of float32 peak', float('nan')):.2f} % "
            "on the small crop): the fixed-point map is "
            "small convolutions, window attention on 32 channels and element-wise work, bound by memory traffic and "
            f"kernel launches rather than arithmetic. GPU busy fraction {g['values'].get('gpu_busy', float('nan')):.0%} "
            "on the small model crop"
            + (
                f", {g['values']['gpu_busy_steady']:.0%} in steady state on the largest tile"
                if "gpu_busy_steady" in g["values"]
                else ""
            )
            + " (goal ≥ 80 %)."
        )
        if "gpu_unmix_mvox_s" in g["values"]:
            line += f" DEQ-Unmix applies at up to {g['values']['gpu_unmix_mvox_s']:.0f} MVox/s."
        out.append(line)
    return out


def render_report(payloads: list[dict[str, Any]]) -> str:
    """docs/benchmarks.md from one or more run payloads plus the other areas' reports."""
    from benchmarks.harness import Section, Target

    lines = [
        "# hyperdeq benchmarks",
        "",
        "Produced by `hyperdeq bench [--size smoke|default|large] [--device cpu|cuda]` "
        "(= `python -m benchmarks`), following the *Pipeline and performance* part of the project's "
        "evaluation protocol (PROTOCOL.md). Every table carries the command, "
        "the device and the versions it was measured with. Machine-readable results: "
        "`benchmarks/results/bench_<size>_<device>.json`. Timings on a shared machine are noisy: "
        "the load average before and after each run is recorded; ratios are more stable than seconds.",
        "",
    ]
    has_gpu = any(pl["device"] == "cuda" and pl["environment"].get("gpu") for pl in payloads)
    if not has_gpu:
        lines += [
            "> **GPU tables are pending a GPU session.** No CUDA device was available where these runs were "
            "made; `hyperdeq bench --device cuda` implements the GPU section (throughput, busy fraction, "
            "largest tile, 1000×1000×224 estimate, bf16) and skips cleanly without CUDA.",
            "",
        ]
    lines += [
        "DECSC's speed with the default settings, the whole CLI run against FastHyDe, what changed "
        "and where the remaining time goes: [benchmarks/decsc_speed.md](benchmarks/decsc_speed.md).",
        "",
    ]
    lines += ["## Targets at a glance", "", _targets_table(payloads)]
    lines += (
        ["## Reading the numbers", ""] + [f"- {b}" for pl in payloads for b in findings(pl)] + [""]
    )
    for pl in payloads:
        env = pl["environment"]
        lines += [
            f"## Run: size `{pl['size']}`, device `{pl['device']}`",
            "",
            f"- command: `{env.get('command')}` (commit {env.get('git_commit')}, started {env.get('started_utc')}, "
            f"{pl['wall_s']:.0f} s in all)",
            f"- CPU: {env.get('cpu')} × {env.get('cpu_cores')} cores, {env.get('memory_gib')} GiB; GPU: {env.get('gpu') or 'none'}",
            f"- load average (1/5/15 min) at start {env.get('load_average_at_start')}, at end "
            f"{env.get('load_average_at_end')} (other jobs were sharing the machine when these differ from ~0)",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()),
            *[f"- **note:** {n}" for n in pl.get("notes", [])],
            "",
        ]
        for s in pl["sections"].values():
            if s["key"] == "overhead" and s["status"] == "ok":
                from benchmarks.pipeline_bench import HALO_TABLE, halo_table

                s["tables"].setdefault(HALO_TABLE, halo_table())
            sec = Section(
                key=s["key"],
                title=s["title"],
                status=s["status"],
                tables=s["tables"],
                values=s["values"],
                notes=s["notes"],
                targets=[Target(**t) for t in s["targets"]],
                wall_s=s["wall_s"],
                error=s.get("error"),
            )
            lines.append(section_markdown(sec, s.get("environment") or env))
    lines += [
        "## Appendix: reports of the benchmark modules owned by other areas",
        "",
        "Included verbatim as committed (each states its own command and device).",
        "",
    ]
    from benchmarks.fragments import FRAGMENTS, docs_for

    seen: set[Path] = set()
    for fr in FRAGMENTS:
        docs = docs_for(fr)
        if not docs:
            lines += [
                f"### benchmarks/{fr.name}.py",
                "",
                f"_No report committed yet ({fr.what})._",
                "",
            ]
        for p in docs:
            if p in seen:
                continue
            seen.add(p)
            body = p.read_text()
            body = "\n".join(("##" + ln) if ln.startswith("#") else ln for ln in body.splitlines())
            lines += [f"<!-- included from docs/benchmarks/{p.name} -->", "", body, ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="default", choices=SIZES)
    ap.add_argument("--device", default="cpu", choices=DEVICES)
    ap.add_argument(
        "--out", type=Path, default=None, help="markdown report (default docs/benchmarks.md)"
    )
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        help="results JSON (default benchmarks/results/bench_<size>_<device>.json)",
    )
    ap.add_argument(
        "--sections", default=None, help=f"comma list, default all: {','.join(SECTION_KEYS)}"
    )
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="rebuild the report from the committed JSON files",
    )
    ap.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="combine the sections of result JSONs of the same size/device (parallel partial runs) into --json",
    )
    a = ap.parse_args(argv)
    if a.merge:
        parts = [json.loads(p.read_text()) for p in a.merge]
        base = parts[0]
        for p in parts[1:]:
            base["sections"].update(p["sections"])
        base["sections"] = {k: base["sections"][k] for k in SECTION_KEYS if k in base["sections"]}
        base["wall_s"] = max(p["wall_s"] for p in parts)
        base["environment"]["command"] = " + ".join(p["environment"]["command"] for p in parts)
        base["environment"]["load_average_at_end"] = parts[-1]["environment"].get(
            "load_average_at_end"
        )
        dest = a.json or RESULTS_DIR / f"bench_{base['size']}_{base['device']}.json"
        write_json(dest, base)
        runs = [base] + _other_runs(dest, base["size"])
        (a.out or DOC).write_text(render_report(runs))
        return 0
    if a.render_only:
        runs = [
            json.loads(p.read_text())
            for p in sorted(RESULTS_DIR.glob("bench_*_*.json"))
            if "smoke" not in p.name
        ]
        (a.out or DOC).write_text(render_report(runs))
        return 0
    secs = tuple(s.strip() for s in a.sections.split(",")) if a.sections else None
    run_bench(a.size, a.device, secs, a.json, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
