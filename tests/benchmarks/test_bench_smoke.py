"""Smoke test of ``hyperdeq bench``: every section runs on real crops and reports finite numbers.

No timing assertions (timings belong in docs/benchmarks.md): the test checks the structure and
that every measured value is a finite number, so a section that silently stops measuring fails.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks.__main__ import SECTION_KEYS, main, run_bench
from pipeline.errors import ConfigError

# starts real multi-process Dask clusters (and a child process per memory case)
pytestmark = pytest.mark.integration


def _numbers(v: Any) -> list[float]:
    if isinstance(v, bool):
        return []
    if isinstance(v, int | float):
        return [float(v)]
    if isinstance(v, dict):
        return [x for k, y in v.items() if not str(k).endswith("_committed") for x in _numbers(y)]
    if isinstance(v, list):
        return [x for y in v for x in _numbers(y)]
    return []


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    import torch

    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("bench")
    js, md = d / "bench_smoke_cpu.json", d / "bench.md"
    run_bench("smoke", "cpu", None, js, md, log=lambda m: None)
    return json.loads(js.read_text()), js, md


def test_every_section_present_and_finite(smoke: tuple[dict[str, Any], Path, Path]) -> None:
    payload, _, _ = smoke
    secs = payload["sections"]
    assert set(secs) == set(SECTION_KEYS)
    for key, s in secs.items():
        assert s["status"] in ("ok", "skipped"), f"{key}: {s['status']} {s.get('error')}"
        if key == "gpu":
            continue
        assert s["status"] == "ok", key
        nums = _numbers(s["values"]) + _numbers(s["tables"])
        assert nums, f"section {key} measured nothing"
        assert all(math.isfinite(x) for x in nums), f"section {key} has non-finite numbers"
    env = payload["environment"]
    assert env["cpu"] and env["versions"]["torch"] and env["command"]


def test_key_figures(smoke: tuple[dict[str, Any], Path, Path]) -> None:
    s = smoke[0]["sections"]
    assert s["throughput"]["values"]["decsc_mvox_s"] > 0
    assert s["throughput"]["values"]["peak_gflop_s"] > 0
    assert s["overhead"]["values"]["overhead_ratio"] > 0
    assert s["overhead"]["values"]["halo_factor"] >= 1.0
    assert s["scaling"]["values"]["scaling_2_over_1"] > 0
    assert len(s["memory"]["values"]["worker_peak_mib"]) == 2
    assert s["solver"]["values"]["cold_iterations_mean"] >= 1
    names = [
        r["model"]
        for r in s["throughput"]["tables"][
            next(k for k in s["throughput"]["tables"] if k.startswith("Throughput"))
        ]
    ]
    assert any(n.startswith("VCA") for n in names) and any(n.startswith("DEQ-Unmix") for n in names)


def test_report_has_every_section_and_gpu_note(smoke: tuple[dict[str, Any], Path, Path]) -> None:
    text = smoke[2].read_text()
    for title in ("Model throughput", "overhead ratio", "Scaling", "Memory", "DEQ solver", "GPU"):
        assert title in text
    assert "GPU tables are pending a GPU session" in text or "GPU:" in text
    assert "| target |" in text or "| run |" in text


def test_rejects_unknown_size_and_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown size 'huge'"):  # refused before anything runs
        run_bench("huge", "cpu", None, tmp_path / "a.json", tmp_path / "a.md")
    with pytest.raises(ConfigError, match="unknown benchmark sections"):
        run_bench("smoke", "cpu", ("nope",), tmp_path / "a.json", tmp_path / "a.md")
    with pytest.raises(SystemExit):
        main(["--device", "tpu"])
