"""Run provenance: the run record (``run.json``), a STAC Item, run identity and lookup.

A run is complete only when its record says so: the record is written with status ``running``
first, and rewritten (atomically) with ``complete`` after every output exists. Failed tiles are
listed and make the status ``failed``; tiles whose solver did not converge are listed as well.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ProvenanceError
from pipeline.hashing import sha256_path, sidecar_files  # noqa: F401  (re-exported)

RUN_JSON = "run.json"
STAC_JSON = "stac_item.json"
RUNNING, COMPLETE, FAILED = "running", "complete", "failed"
PROCESSING_EXT = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
PROJECTION_EXT = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
_PACKAGES = ("hyperdeq", "numpy", "xarray", "zarr", "dask", "distributed", "rasterio", "rioxarray",
             "torch", "prefect", "pystac", "scipy")


def portable(text: str) -> str:
    """``text`` (a command line, a path) with this machine's paths made portable, for results that
    are committed: the repository root becomes relative, the shared data folder beside it
    ``../shared``, the temporary directory ``<tmp>`` and the home directory ``~``."""
    import tempfile

    root = Path(__file__).resolve().parents[1]
    subs = [(str(root) + "/", ""), (str(root.parent / "shared"), "../shared"),
            (str(Path(tempfile.gettempdir())), "<tmp>"), (str(Path.home()), "~")]
    for old, new in subs:
        if old not in ("/", ""):
            text = text.replace(old, new)
    return text


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def make_run_id(input_sha256: str, config_hash: str, weights_sha256s: dict[str, str | None]) -> str:
    """Deterministic run id: same input, configuration and weights → same id (resume/reuse)."""
    blob = json.dumps([input_sha256, config_hash, sorted((k, v or "") for k, v in weights_sha256s.items())])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def package_versions(names: Sequence[str] = _PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def code_version() -> str:
    """``git describe --always --dirty`` of the source tree, or the package version."""
    here = Path(__file__).resolve().parents[1]
    try:
        r = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here,
                           capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return package_versions(("hyperdeq",)).get("hyperdeq") or "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info(gpu: str | None = None) -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "gpu": gpu}


def _atomic_write(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def summarise_tiles(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Failed and non-converged tiles listed by key, plus counts."""
    failed = [r["key"] for r in records if r.get("status") == "failed"]
    nc = [r["key"] for r in records if r.get("status") == "ok" and r.get("converged") is False]
    return {"n_tiles": len(records), "n_ok": sum(r.get("status") == "ok" for r in records),
            "failed": failed, "not_converged": nc}


def write_run_record(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write ``run.json`` atomically (the status inside decides whether the run counts as complete)."""
    if record.get("status") not in (RUNNING, COMPLETE, FAILED):
        raise ProvenanceError(f"run status must be one of {[RUNNING, COMPLETE, FAILED]!r}, got {record.get('status')!r}")
    p = Path(run_dir) / RUN_JSON
    _atomic_write(p, record)
    return p


def load_run_record(run_dir: str | Path) -> dict[str, Any]:
    p = Path(run_dir) / RUN_JSON
    try:
        return json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise ProvenanceError(f"no run record at {str(p)!r}; the run never started or was removed") from exc
    except ValueError as exc:
        raise ProvenanceError(f"run record {str(p)!r} is corrupt ({exc}); rerun the scene") from exc


def is_complete(run_dir: str | Path) -> bool:
    try:
        rec = load_run_record(run_dir)
    except ProvenanceError:
        return False
    return rec.get("status") == COMPLETE and all((Path(run_dir) / o).exists() for o in rec.get("outputs", {}).values())


def find_completed_run(
    out_root: str | Path, input_sha256: str, config_hash: str, weights_sha256s: dict[str, str | None]
) -> Path | None:
    """The run directory under ``out_root`` that already holds this exact run, complete; else None."""
    root = Path(out_root)
    if not root.is_dir():
        return None
    want = {k: v for k, v in weights_sha256s.items()}
    for rec_path in sorted(root.glob(f"**/{RUN_JSON}")):
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            continue
        if (rec.get("status") == COMPLETE and rec.get("input", {}).get("sha256") == input_sha256
                and rec.get("config_hash") == config_hash
                and {m["name"]: m.get("weights_sha256") for m in rec.get("models", [])} == want
                and is_complete(rec_path.parent)):
            return rec_path.parent
    return None


def stac_item(record: dict[str, Any], geo: dict[str, Any], bbox: list[float] | None, geometry: dict[str, Any] | None) -> dict[str, Any]:
    """A STAC Item (processing + projection extensions) describing the run's outputs."""
    import pystac

    dt_end = dt.datetime.fromisoformat(str(record.get("end") or record["start"]).replace("Z", "+00:00"))
    item = pystac.Item(
        id=f"hyperdeq-{record['run_id']}", geometry=geometry, bbox=bbox, datetime=dt_end,
        properties={
            "processing:software": {"hyperdeq": record.get("code_version", "unknown")},
            "processing:lineage": (
                f"hyperdeq tiled run of {Path(record['input']['path']).name}: "
                + " -> ".join(m["name"] for m in record.get("models", []))
            ),
            "processing:level": "L3",
            "processing:facility": record.get("host", {}).get("hostname"),
            "processing:datetime": record.get("end") or record["start"],
            "hyperdeq:run_id": record["run_id"],
            "hyperdeq:config_hash": record.get("config_hash"),
            "hyperdeq:status": record.get("status"),
        },
        stac_extensions=[PROCESSING_EXT] + ([PROJECTION_EXT] if "proj:code" in geo or "proj:wkt2" in geo else []),
    )
    for k in ("proj:code", "proj:wkt2", "proj:transform", "proj:shape"):
        if k in geo:
            item.properties[k] = geo[k]
    media = {".zarr": "application/vnd+zarr", ".tif": pystac.MediaType.COG, ".png": pystac.MediaType.PNG,
             ".csv": "text/csv", ".json": pystac.MediaType.JSON}
    for key, rel in sorted(record.get("outputs", {}).items()):
        item.add_asset(key, pystac.Asset(href=f"./{rel}", media_type=media.get(Path(rel).suffix), roles=["data"]))
    item.add_asset("run_record", pystac.Asset(href=f"./{RUN_JSON}", media_type=pystac.MediaType.JSON, roles=["metadata"]))
    return item.to_dict(include_self_link=False)


def write_stac_item(run_dir: str | Path, item: dict[str, Any]) -> Path:
    p = Path(run_dir) / STAC_JSON
    _atomic_write(p, item)
    return p
