"""Reliability suite fixtures and the outcome log behind ``docs/reliability.md``.

Every test (and every parametrised case) declares what it tries and what it expects with the
``case`` fixture; a report hook stores the outcome. At the end of the session, when
``HYPERDEQ_RELIABILITY_REPORT=1``, the cases are merged by test id into
``benchmarks/results/reliability.json`` (each row keeps the time it ran) and rendered to
``docs/reliability.md``; ordinary runs leave the committed report alone.
``python -m tests.reliability.report`` renders the JSON again.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability import report

_CASES: dict[str, dict[str, Any]] = {}
#: test ids this session collected, deselected ones included (to drop rows of tests that no longer exist)
_COLLECTED: set[str] = set()


class Case:
    """What one test tries (``kind``/``what``), what it expects, and what was measured."""

    def __init__(self, nodeid: str) -> None:
        self.row: dict[str, Any] = {
            "nodeid": nodeid,
            "kind": "",
            "what": "",
            "expected": "",
            "measured": {},
        }
        _CASES[nodeid] = self.row

    def __call__(self, kind: str, what: str, expected: str) -> Case:
        self.row.update(kind=kind, what=what, expected=expected)
        return self

    def measure(self, **values: Any) -> None:
        """Record numbers/facts the test observed (shown in the report)."""
        self.row["measured"].update(values)


@pytest.fixture
def case(request: pytest.FixtureRequest) -> Case:
    return Case(request.node.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    row = _CASES.get(item.nodeid)
    if row is None:
        return
    if rep.when == "call" or (rep.when == "setup" and rep.outcome != "passed"):
        if hasattr(rep, "wasxfail"):
            row["outcome"] = "xfail" if rep.skipped else "XPASS"
            row["xfail_reason"] = rep.wasxfail
        else:
            row["outcome"] = rep.outcome
        row["duration_s"] = round(rep.duration, 2)
        if rep.failed:
            row["error"] = str(rep.longrepr).strip().splitlines()[-1][:300]
        if rep.skipped and not hasattr(rep, "wasxfail"):
            row["skip_reason"] = (
                str(rep.longrepr[-1]) if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
            )


def pytest_deselected(items: list[pytest.Item]) -> None:
    _COLLECTED.update(i.nodeid for i in items)


def pytest_collection_finish(session: pytest.Session) -> None:
    _COLLECTED.update(i.nodeid for i in session.items)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Merge this session's cases into the results JSON (by test id) and re-render the markdown.

    Rows of a test file this session collected whose test id it no longer has (a renamed or removed
    test or case) are dropped; rows of files not collected this time are kept as they were.
    """
    if not _CASES or os.environ.get("HYPERDEQ_RELIABILITY_REPORT") != "1":
        return
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    old: dict[str, dict[str, Any]] = {}
    if report.RESULTS_JSON.is_file():
        try:
            old = {
                r["nodeid"]: r for r in json.loads(report.RESULTS_JSON.read_text()).get("cases", [])
            }
        except (ValueError, KeyError):
            old = {}
    for row in _CASES.values():
        row["run_at"] = now
    files = {n.split("::", 1)[0] for n in _COLLECTED}
    old = {k: r for k, r in old.items() if k in _COLLECTED or k.split("::", 1)[0] not in files}
    merged = {**old, **_CASES}
    rows = sorted(merged.values(), key=lambda r: (report.KIND_ORDER.get(r["kind"], 9), r["nodeid"]))
    payload = {
        "generated": now,
        "exitstatus": int(exitstatus),
        "cases": rows,
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1_5_15_min": [round(v, 1) for v in os.getloadavg()],
        },
    }
    report.RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    from pipeline.provenance import portable

    # committed: no paths of this machine (pytest's temporary folders, the checkout)
    payload = json.loads(portable(json.dumps(payload, default=str)))
    report.RESULTS_JSON.write_text(json.dumps(payload, indent=1, default=str))
    report.render(payload)


@pytest.fixture(autouse=True)
def _quiet_and_single_threaded(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One BLAS/torch thread per process (the machine is shared); CRS warnings are expected here."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="session")
def demo_crop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 64x64x40 crop of the demo scene (fully valid block), shared read-only by tests."""
    from tests.reliability._data import crop_geotiff

    return crop_geotiff(tmp_path_factory.mktemp("crop") / "potsdam_crop.tif")
