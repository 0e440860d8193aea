"""Run provenance: hashing, run identity, commit markers, STAC Item, completed-run lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pystac
import pytest

from pipeline import provenance as prov
from pipeline.errors import ProvenanceError


def _record(run_dir: Path, status: str, **kw: object) -> dict:
    (run_dir / "out.tif").write_bytes(b"data")
    rec = {
        "run_id": run_dir.name,
        "status": status,
        "start": "2026-01-01T00:00:00Z",
        "end": "2026-01-01T00:01:00Z",
        "input": {"path": "/x/scene.tif", "sha256": "a" * 64},
        "config_hash": "c" * 64,
        "models": [{"name": "decsc", "weights_sha256": "w" * 64}],
        "outputs": {"denoised_tif": "out.tif"},
        "failed_tiles": [],
        "not_converged_tiles": [],
        "tiles": {},
    }
    rec.update(kw)
    prov.write_run_record(run_dir, rec)
    return rec


def test_sha256_of_files_and_folders(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello")
    assert prov.sha256_path(f) == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    d = tmp_path / "d"
    (d / "s").mkdir(parents=True)
    (d / "s" / "x").write_bytes(b"1")
    h1 = prov.sha256_path(d)
    (d / "s" / "x").write_bytes(b"2")
    assert prov.sha256_path(d) != h1
    with pytest.raises(
        ProvenanceError,
        match=r"cannot read input .*missing.* \(No such file or directory\); check the path",
    ):
        prov.sha256_path(tmp_path / "missing")


def test_run_id_changes_with_input_config_or_weights() -> None:
    base = prov.make_run_id("a", "c", {"decsc": "w"})
    assert base == prov.make_run_id("a", "c", {"decsc": "w"})
    assert (
        len(
            {
                base,
                prov.make_run_id("b", "c", {"decsc": "w"}),
                prov.make_run_id("a", "d", {"decsc": "w"}),
                prov.make_run_id("a", "c", {"decsc": "v"}),
                prov.make_run_id("a", "c", {"decsc": "w", "deq-unmix": None}),
            }
        )
        == 5
    )


def test_only_a_complete_record_with_intact_outputs_counts(tmp_path: Path) -> None:
    from pipeline.hashing import output_entry

    run = tmp_path / "scene" / "r1"
    run.mkdir(parents=True)
    (run / "out.tif").write_bytes(b"real output bytes")
    entry = {"out_tif": output_entry(run / "out.tif", run)}
    prov.write_run_record(run, {"status": prov.RUNNING, "outputs": entry})
    assert not prov.is_complete(run)  # a crashed run never looks complete
    prov.write_run_record(run, {"status": prov.COMPLETE, "outputs": entry})
    assert prov.is_complete(run) and prov.output_problems(run) == []
    (run / "out.tif").write_bytes(b"real output byteZ")  # same size, other content
    assert not prov.is_complete(run)
    assert "sha256" in prov.output_problems(run)[0]
    (run / "out.tif").unlink()  # an output went missing: no longer complete
    assert prov.output_problems(run) == ["'out.tif' is missing"]
    prov.write_run_record(run, {"status": prov.COMPLETE, "outputs": {"out_tif": "out.tif"}})
    assert not prov.is_complete(run)  # an output without a checksum cannot be verified
    prov.write_run_record(run, {"status": prov.FAILED, "outputs": {}})
    assert not prov.is_complete(run)


def test_bad_status_and_corrupt_record_raise(tmp_path: Path) -> None:
    with pytest.raises(ProvenanceError, match=r"run status must be one of .* got 'done'"):
        prov.write_run_record(tmp_path, {"status": "done"})
    (tmp_path / "run.json").write_text("{trunc")
    with pytest.raises(ProvenanceError, match=r"is corrupt .* rerun the scene"):
        prov.load_run_record(tmp_path)
    assert not prov.is_complete(tmp_path)


def test_tile_summary_lists_failed_and_not_converged() -> None:
    recs = [
        {"key": "a", "status": "ok", "converged": True},
        {"key": "b", "status": "failed"},
        {"key": "c", "status": "ok", "converged": False},
    ]
    assert prov.summarise_tiles(recs) == {
        "n_tiles": 3,
        "n_ok": 2,
        "failed": ["b"],
        "not_converged": ["c"],
    }


def test_stac_item_has_processing_and_projection(tmp_path: Path) -> None:
    rec = _record(tmp_path, prov.COMPLETE, code_version="v0.1-3-gabc", host={"hostname": "h"})
    geo = {"proj:code": "EPSG:32633", "proj:transform": [30, 0, 1, 0, -30, 2], "proj:shape": [4, 5]}
    item = prov.stac_item(
        rec,
        geo,
        [13.0, 52.3, 13.1, 52.4],
        {
            "type": "Polygon",
            "coordinates": [[[13.0, 52.3], [13.1, 52.3], [13.1, 52.4], [13.0, 52.3]]],
        },
    )
    p = prov.write_stac_item(tmp_path, item)
    back = pystac.Item.from_dict(json.loads(p.read_text()))
    assert (
        prov.PROCESSING_EXT in back.stac_extensions and prov.PROJECTION_EXT in back.stac_extensions
    )
    assert back.properties["processing:software"] == {"hyperdeq": "v0.1-3-gabc"}
    assert back.properties["proj:code"] == "EPSG:32633"
    assert set(back.assets) == {"denoised_tif", "run_record"}
    assert back.assets["denoised_tif"].href == "./out.tif"


def test_environment_capture() -> None:
    v = prov.package_versions()
    assert v["numpy"] and v["zarr"].startswith("3.")
    assert prov.code_version()
    h = prov.host_info("NVIDIA H100")
    assert h["cpu_count"] >= 1 and h["gpu"] == "NVIDIA H100"


def test_portable_removes_this_machines_paths() -> None:
    import tempfile

    from pipeline.provenance import portable

    root = Path(__file__).resolve().parents[2]
    tmp = Path(tempfile.gettempdir())
    text = f"hyperdeq eval --data {root.parent / 'shared' / 'data'} --out {tmp / 'ev.md'} {root / 'tests' / 'x.tif'}"
    assert portable(text) == "hyperdeq eval --data ../shared/data --out <tmp>/ev.md tests/x.tif"
    assert portable("python -m benchmarks --size smoke") == "python -m benchmarks --size smoke"
