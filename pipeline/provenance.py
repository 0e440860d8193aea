"""Run provenance: the run record (``run.json``), a STAC Item, run identity and lookup.

A run is complete only when its record says so: the record is written with status ``running``
first, and rewritten (atomically) with ``complete`` after every output exists. Failed tiles are
listed and make the status ``failed``; tiles whose solver did not converge are listed as well.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.environment import code_version, cpu_model, host_info, package_versions  # noqa: F401 (re-exported)
from pipeline.errors import ProvenanceError
from pipeline.hashing import sha256_path, sidecar_files  # noqa: F401  (re-exported)

RUN_JSON = "run.json"
STAC_JSON = "stac_item.json"
RUNNING, COMPLETE, FAILED = "running", "complete", "failed"
#: a run stopped by a signal or a cancellation (``workers.run.RunCancelled``); resumable like a failed one
CANCELLED = "cancelled"
STATUSES = (RUNNING, COMPLETE, FAILED, CANCELLED)
PROCESSING_EXT = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
PROJECTION_EXT = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"


def portable(text: str) -> str:
    """``text`` (a command line, a path) with this machine's paths made portable, for results that
    are committed: the repository root becomes relative, the shared data folder beside it
    ``../shared``, the temporary directory ``<tmp>`` and the home directory ``~``."""
    import tempfile

    root = Path(__file__).resolve().parents[1]
    subs = [
        (str(root) + "/", ""),
        (str(root.parent / "shared"), "../shared"),
        (str(Path(tempfile.gettempdir())), "<tmp>"),
        (str(Path.home()), "~"),
    ]
    for old, new in subs:
        if old not in ("/", ""):
            text = text.replace(old, new)
    return text


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def make_run_id(input_sha256: str, config_hash: str, weights_sha256s: dict[str, str | None]) -> str:
    """Deterministic run id: same input, configuration and weights → same id (resume/reuse)."""
    blob = json.dumps(
        [input_sha256, config_hash, sorted((k, v or "") for k, v in weights_sha256s.items())]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _atomic_write(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def summarise_tiles(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Failed and non-converged tiles listed by key, plus counts."""
    failed = [r["key"] for r in records if r.get("status") == "failed"]
    nc = [r["key"] for r in records if r.get("status") == "ok" and r.get("converged") is False]
    return {
        "n_tiles": len(records),
        "n_ok": sum(r.get("status") == "ok" for r in records),
        "failed": failed,
        "not_converged": nc,
    }


def write_run_record(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write ``run.json`` atomically (the status inside decides whether the run counts as complete)."""
    if record.get("status") not in STATUSES:
        raise ProvenanceError(
            f"run status must be one of {list(STATUSES)!r}, got {record.get('status')!r}"
        )
    p = Path(run_dir) / RUN_JSON
    _atomic_write(p, record)
    return p


def load_run_record(run_dir: str | Path) -> dict[str, Any]:
    p = Path(run_dir) / RUN_JSON
    try:
        return json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise ProvenanceError(
            f"no run record at {str(p)!r}; the run never started or was removed"
        ) from exc
    except ValueError as exc:
        raise ProvenanceError(f"run record {str(p)!r} is corrupt ({exc}); rerun the scene") from exc


def output_problems(run_dir: str | Path) -> list[str]:
    """What is wrong with a run's recorded outputs (missing, other size or sha256); [] when intact."""
    from pipeline.hashing import verify_entry

    rec = load_run_record(run_dir)
    problems = []
    for key, entry in (rec.get("outputs") or {}).items():
        if not isinstance(entry, dict):
            problems.append(f"{key}: recorded without a checksum (written by an older hyperdeq)")
            continue
        why = verify_entry(entry, run_dir)
        if why:
            problems.append(why)
    return problems


def is_complete(run_dir: str | Path) -> bool:
    """True when ``run.json`` says complete and every output it lists is intact (size and sha256)."""
    try:
        rec = load_run_record(run_dir)
    except ProvenanceError:
        return False
    return (
        rec.get("status") == COMPLETE and bool(rec.get("outputs")) and not output_problems(run_dir)
    )


EO_EXT = "https://stac-extensions.github.io/eo/v2.0.0/schema.json"
RASTER_EXT = "https://stac-extensions.github.io/raster/v2.0.0/schema.json"
#: the extension schemas the Item uses, shipped as package data (``pipeline/stac_schemas``) so
#: that validation needs no network; the core Item schema comes with pystac
STAC_SCHEMA_FILES = {
    PROCESSING_EXT: "processing-v1.2.0.json",
    PROJECTION_EXT: "projection-v2.0.0.json",
    EO_EXT: "eo-v2.0.0.json",
    RASTER_EXT: "raster-v2.0.0.json",
}
_MEDIA = {
    ".zarr": "application/vnd+zarr",
    ".tif": "image/tiff; application=geotiff; profile=cloud-optimized",
    ".png": "image/png",
    ".csv": "text/csv",
    ".json": "application/json",
}


def _iso(t: str | dt.datetime) -> dt.datetime:
    v = (
        t
        if isinstance(t, dt.datetime)
        else dt.datetime.fromisoformat(str(t).replace("Z", "+00:00"))
    )
    return v if v.tzinfo is not None else v.replace(tzinfo=dt.UTC)


def stac_bands(scene: Any) -> list[dict[str, Any]]:
    """STAC 1.1 ``bands`` of a scene: name, description, ``eo:center_wavelength`` and
    ``eo:full_width_half_max`` (micrometres, as the eo extension wants), ``hyperdeq:good_band``."""
    import numpy as np

    wl = np.asarray(scene["wavelength"].values, dtype=float)
    fw = np.asarray(scene["fwhm"].values, dtype=float)
    good = np.asarray(scene["good_band"].values, dtype=bool)
    out = []
    for i, (w, f, g) in enumerate(zip(wl, fw, good, strict=True)):
        b: dict[str, Any] = {"name": f"b{i + 1:03d}", "hyperdeq:good_band": bool(g)}
        if np.isfinite(w):
            b["description"] = f"{w:.2f} nm" + ("" if g else " (bad band)")
            b["eo:center_wavelength"] = round(float(w) / 1000.0, 6)
        if np.isfinite(f) and f > 0:
            b["eo:full_width_half_max"] = round(float(f) / 1000.0, 6)
        out.append(b)
    return out


def _endmember_names(run_dir: str | Path | None, outputs: dict[str, str]) -> list[str] | None:
    if run_dir is None or "abundances_zarr" not in outputs:
        return None
    try:
        import numpy as np
        import zarr

        arr = zarr.open_array(
            str(Path(run_dir) / outputs["abundances_zarr"] / "endmember"), mode="r"
        )
        return [str(v) for v in np.asarray(arr[...]).ravel()]
    except Exception:
        return None


def _stac_properties(record: dict[str, Any], processed: str, acquired: bool) -> dict[str, Any]:
    """The Item's processing and ``hyperdeq:`` properties from the run record.

    ``processed`` (the run's end or start) gives ``processing:datetime`` and ``created``;
    ``acquired`` says whether the Item's ``datetime`` comes from the scene.
    """
    props: dict[str, Any] = {
        "processing:software": {"hyperdeq": str(record.get("code_version", "unknown"))},
        "processing:lineage": (
            f"hyperdeq tiled run of {Path(record['input']['path']).name}: "
            + " -> ".join(m["name"] for m in record.get("models", []))
        ),
        "processing:level": "L3",
        "processing:datetime": _iso(processed).isoformat().replace("+00:00", "Z"),
        "created": _iso(processed).isoformat().replace("+00:00", "Z"),
        "hyperdeq:datetime_source": "acquisition"
        if acquired
        else "processing (the input has no acquisition time)",
        "hyperdeq:run_id": record["run_id"],
        "hyperdeq:config_hash": record.get("config_hash"),
        "hyperdeq:status": record.get("status"),
    }
    facility = record.get("host", {}).get("hostname")
    if facility:
        props["processing:facility"] = str(facility)
    return props


def _asset_fields(
    key: str,
    suffix: str,
    spectral: list[dict[str, Any]] | None,
    names: list[str] | None,
    scale: Any,
    res: float | None,
) -> dict[str, Any]:
    """Extra fields of one output asset: its content, and for rasters and zarr stores its ``bands``.

    ``bands`` is present only for ``.tif``/``.zarr`` outputs whose bands are known (spectral bands
    of the denoised cube, endmember names of the abundances, the RMSE band); GeoTIFFs also get the
    ``raster:`` fields.
    """
    extra: dict[str, Any] = {}
    bands: list[dict[str, Any]] | None = None
    if key.startswith("denoised") and spectral is not None:
        bands = [dict(b) for b in spectral]
        extra["hyperdeq:content"] = "denoised surface reflectance in [0, 1]"
        if scale is not None:
            extra["hyperdeq:source_scale_factor"] = float(scale)
    elif key.startswith("abundances") and names is not None:
        bands = [{"name": str(n), "description": f"abundance of endmember {n}"} for n in names]
        extra["hyperdeq:content"] = "endmember abundances (fractions, sum to one)"
    elif key.startswith("rmse"):
        bands = [{"name": "rmse", "description": "unmixing reconstruction RMSE over good bands"}]
    if bands is not None and suffix in (".tif", ".zarr"):
        for b in bands:
            b.update({"data_type": "float32", "nodata": "nan", "unit": "1"})
        extra["bands"] = bands
        if suffix == ".tif":
            extra["raster:sampling"] = "area"
            extra["raster:bits_per_sample"] = 32
            if res is not None:
                extra["raster:spatial_resolution"] = res
    return extra


def stac_item(
    record: dict[str, Any],
    geo: dict[str, Any],
    bbox: list[float] | None,
    geometry: dict[str, Any] | None,
    *,
    scene: Any | None = None,
    run_dir: str | Path | None = None,
    endmembers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A STAC 1.1 Item (processing, projection, eo, raster extensions) describing the run's outputs.

    ``datetime`` is the scene's acquisition time (``scene.attrs``: EnMAP ``start_time`` and the
    like, see :func:`pipeline.writers.acquisition_time`); only when the input carries none is it the
    processing time, and ``hyperdeq:datetime_source`` says which. ``processing:datetime`` and
    ``created`` are always the processing time. With ``scene``, the spectral assets list their
    ``bands`` (centre wavelength and FWHM in µm, good-band flag); the abundance assets list the
    endmembers (``endmembers``, or read from ``run_dir``'s abundance store). Quicklooks have the
    role ``overview``, the run record and endmember tables ``metadata``.
    """
    import pystac

    from pipeline.writers import acquisition_time

    processed = str(record.get("end") or record["start"])
    acquired = acquisition_time(scene) if scene is not None else None
    acquired = acquired or record.get("input", {}).get("acquisition_time")
    exts = [PROCESSING_EXT]
    if "proj:code" in geo or "proj:wkt2" in geo:
        exts.append(PROJECTION_EXT)
    props = _stac_properties(record, processed, bool(acquired))
    item = pystac.Item(
        id=f"hyperdeq-{record['run_id']}",
        geometry=geometry,
        bbox=bbox,
        datetime=_iso(acquired or processed),
        properties=props,
        stac_extensions=exts,
    )
    for k in ("proj:code", "proj:wkt2", "proj:transform", "proj:shape"):
        if k in geo:
            item.properties[k] = geo[k]
    outputs = {
        k: str(v["path"] if isinstance(v, dict) else v)
        for k, v in (record.get("outputs") or {}).items()
    }
    spectral = stac_bands(scene) if scene is not None else None
    names = list(endmembers) if endmembers is not None else _endmember_names(run_dir, outputs)
    res = _square_resolution(geo)
    scale = getattr(scene, "attrs", {}).get("source_scale_factor") if scene is not None else None
    used_eo = used_raster = False
    for key, rel in sorted(outputs.items()):
        suffix = Path(rel).suffix
        extra = _asset_fields(key, suffix, spectral, names, scale, res)
        if "bands" in extra:
            used_eo = used_eo or any("eo:center_wavelength" in b for b in extra["bands"])
            used_raster = used_raster or suffix == ".tif"
        asset = pystac.Asset(
            href=f"./{rel}",
            media_type=_MEDIA.get(suffix),
            roles=_asset_roles(key, suffix),
            extra_fields=extra,
        )
        item.add_asset(key, asset)
    item.add_asset(
        "run_record",
        pystac.Asset(href=f"./{RUN_JSON}", media_type=_MEDIA[".json"], roles=["metadata"]),
    )
    if used_eo:
        item.stac_extensions.append(EO_EXT)
    if used_raster:
        item.stac_extensions.append(RASTER_EXT)
    return item.to_dict(include_self_link=False)


def _square_resolution(geo: dict[str, Any]) -> float | None:
    """The pixel size when pixels are square (``proj:transform``), else None."""
    t = geo.get("proj:transform")
    if t is None:
        return None
    return abs(float(t[0])) if abs(float(t[0])) == abs(float(t[4])) else None


def _asset_roles(key: str, suffix: str) -> list[str]:
    """Quicklooks are overviews, endmember tables metadata, the rest data."""
    if suffix == ".png":
        return ["overview"]
    return ["metadata"] if key.startswith("endmembers") else ["data"]


def stac_schemas() -> dict[str, dict[str, Any]]:
    """The shipped extension schemas, ``{schema URI: schema}`` (no network)."""
    from importlib.resources import files

    folder = files("pipeline").joinpath("stac_schemas")
    return {
        uri: json.loads(folder.joinpath(name).read_text())
        for uri, name in STAC_SCHEMA_FILES.items()
    }


def validate_stac_item(item: dict[str, Any]) -> None:
    """Validate an Item against the STAC core schema (from pystac) and the shipped extension schemas.

    Offline: an extension the Item declares but hyperdeq does not ship is a
    :class:`ProvenanceError`, never a download.
    """
    import pystac
    from pystac.validation.stac_validator import JsonSchemaSTACValidator

    shipped = stac_schemas()
    unknown = [e for e in item.get("stac_extensions", []) if e not in shipped]
    if unknown:
        raise ProvenanceError(
            f"STAC Item {item.get('id')!r} declares extensions {unknown!r} whose schemas are not shipped "
            f"in pipeline/stac_schemas; add them there (and to STAC_SCHEMA_FILES) to validate offline"
        )
    v = JsonSchemaSTACValidator()
    v.schema_cache.update(shipped)
    try:
        pystac.validation.validate_dict(item, validator=v)
    except pystac.STACValidationError as exc:
        raise ProvenanceError(
            f"STAC Item {item.get('id')!r} is not valid: {exc}; fix provenance.stac_item"
        ) from exc


def write_stac_item(run_dir: str | Path, item: dict[str, Any]) -> Path:
    p = Path(run_dir) / STAC_JSON
    _atomic_write(p, item)
    return p
