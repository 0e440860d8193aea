"""The one place that hashes files: inputs (with their sidecars), weights, fitted models, outputs.

Each input is hashed once per run (``workers.run.plan_run``) and that digest is used everywhere
(run id, run record, the ingested store's ``source_sha256``).
"""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path
from typing import Any

from pipeline.errors import ProvenanceError

CHUNK = 1 << 20
_DATA_SUFFIXES = (".bsq", ".bil", ".bip", ".img", ".dat", ".raw")


def sidecar_files(path: str | Path) -> list[Path]:
    """Files beside the scene file ``path`` that its reader also reads, so they are part of its content.

    An ENVI data file's ``.hdr`` (or, given the ``.hdr``, its data file) and GDAL's ``.aux.xml``
    (where GeoTIFFs keep wavelengths, scale and nodata): fixing a header changes the scene.
    """
    p = Path(path)
    if not p.is_file():
        return []
    out: list[Path] = []
    if p.suffix.lower() == ".hdr":
        for cand in (p.with_suffix(""), *(p.with_suffix(e) for e in _DATA_SUFFIXES)):
            if cand.is_file():
                out.append(cand)
                break
    else:
        for cand in (Path(str(p) + ".hdr"), p.with_suffix(".hdr")):
            if cand.is_file() and cand != p:
                out.append(cand)
                break
    aux = Path(str(p) + ".aux.xml")
    if aux.is_file():
        out.append(aux)
    return out


def _update(h: Any, f: Path) -> None:
    with open(f, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)


def sha256_file(path: str | Path) -> str:
    """sha256 of one regular file's bytes."""
    h = hashlib.sha256()
    _update(h, Path(path))
    return h.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """sha256 over the relative names and bytes of every file under the folder ``path`` (sorted)."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256 of a scene input: a file with its :func:`sidecar_files`, or a folder (zarr store).

    Refuses what cannot be a scene (a missing path, an empty folder, a FIFO or device) with a
    message saying what was found.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise ProvenanceError(
            f"cannot read input {str(p)!r} ({exc.strerror or exc}); check the path"
        ) from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ProvenanceError(
            f"input {str(p)!r} is not a regular file or a folder (a FIFO, socket or device); "
            "give a scene file or a zarr store"
        )
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    if not files:
        raise ProvenanceError(
            f"input {str(p)!r} is an empty folder; give a scene file or a zarr store"
        )
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        _update(h, f)
    for side in sidecar_files(p):  # none for a plain file: its hash is the file's own sha256
        h.update(b"\0sidecar\0" + side.name.encode())
        _update(h, side)
    return h.hexdigest()


def output_entry(path: str | Path, root: str | Path) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of an output file or folder, relative to ``root`` (run.json)."""
    p = Path(path)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        digest = sha256_tree(p)
        n = len(files)
    else:
        size, digest, n = p.stat().st_size, sha256_file(p), 1
    return {"path": str(p.relative_to(root)), "bytes": int(size), "files": n, "sha256": digest}


def verify_entry(entry: dict[str, Any], root: str | Path) -> str | None:
    """None when the output ``entry`` describes is intact under ``root``, else what is wrong."""
    p = Path(root) / str(entry.get("path", ""))
    if not p.exists():
        return f"{entry.get('path')!r} is missing"
    try:
        now = output_entry(p, root)
    except OSError as exc:
        return f"{entry.get('path')!r} cannot be read ({exc})"
    for key in ("files", "bytes", "sha256"):
        if key in entry and now[key] != entry[key]:
            return f"{entry.get('path')!r} has {key} {now[key]!r}, the record says {entry[key]!r}"
    return None
