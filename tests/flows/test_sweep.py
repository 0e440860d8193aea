"""Archive scanning and the ``sweep_archive`` flow on small real EnMAP scenes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.sweep import read_list_file, scan_archive
from pipeline.errors import ConfigError, ReadError

from .conftest import decsc_installed


def test_scan_with_presets_finds_only_scenes(small_archive: Path) -> None:
    found = scan_archive(small_archive, sensors=["enmap"])
    assert [p.name for p in found] == ["enmap_potsdam_tile_a.tif", "enmap_potsdam_tile_b.tif"]
    assert scan_archive(small_archive) == found  # all presets: the others match nothing here


def test_scan_errors_say_what_to_do(small_archive: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pattern '\*\*/\*.hdr' matches no file"):
        scan_archive(small_archive, patterns=["**/*_a.tif", "**/*.hdr"])
    with pytest.raises(ConfigError, match=r"unknown sensor preset\(s\) \['hyperion'\]"):
        scan_archive(small_archive, sensors=["hyperion"])
    with pytest.raises(ConfigError, match="no scene under .* matches the patterns of \\['emit'\\]"):
        scan_archive(small_archive, sensors=["emit"])
    with pytest.raises(ReadError, match="is not a directory"):
        scan_archive(tmp_path / "nope")
    assert [p.name for p in scan_archive(small_archive, patterns=["**/*_b.tif"])] == [
        "enmap_potsdam_tile_b.tif"
    ]


def test_list_file(small_archive: Path, tmp_path: Path) -> None:
    lst = tmp_path / "scenes.txt"
    a = next(small_archive.rglob("*_a.tif"))
    lst.write_text(f"# nightly list\n{a}\n\n{a}  # twice\n")
    assert read_list_file(lst) == [a.resolve()]
    lst.write_text("missing.tif\n")
    with pytest.raises(ReadError, match="line 1: scene 'missing.tif' does not exist"):
        read_list_file(lst)
    lst.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="names no scene"):
        read_list_file(lst)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # one per-scene unmixer fit dominates; generous for loaded CI machines
def test_sweep_is_idempotent_and_isolates_failures(
    prefect_harness: None, small_archive: Path, tmp_path: Path
) -> None:
    from flows.options import RunOptions
    from flows.sweep import sweep_archive

    bad = small_archive / "2022" / "07" / "images" / "enmap_potsdam_tile_bad.tif"
    good = next(small_archive.rglob("*_a.tif")).read_bytes()
    bad.write_bytes(good[:4096])  # a truncated real file: refused when its header is read
    # one good scene keeps the test to one unmixer fit (the scan tests above cover two)
    next(small_archive.rglob("*_b.tif")).unlink()
    out = tmp_path / "out"
    # keep_tiles: the tile stores stay, as they do when a run is cut off before its record (below)
    opts = RunOptions(
        denoise=decsc_installed(),
        unmix=True,
        endmembers=3,
        tile=32,
        batch=2,
        workers=1,
        keep_tiles=True,
    )
    kw = dict(
        root=str(small_archive),
        out_root=str(out),
        sensors=["enmap"],
        max_concurrent=2,
        options=opts,
    )

    state = sweep_archive(**kw, return_state=True)
    # a failed scene fails the sweep (alerts fire) after the others ran; the table is its data
    assert state.is_failed() and "1 of 2 scenes failed" in state.message, state
    first = state.result(raise_on_failure=False)
    assert [Path(p).name for p in first["processed"]] == ["enmap_potsdam_tile_a.tif"], first
    assert [Path(f["scene"]).name for f in first["failed"]] == ["enmap_potsdam_tile_bad.tif"], first
    reason = first["failed"][0]["reason"]  # the reason is reported, naming the file and the cause
    assert "enmap_potsdam_tile_bad.tif" in reason and "corrupt or truncated" in reason, reason
    records = sorted(out.glob("enmap_potsdam_tile_a/*/run.json"))
    assert len(records) == 1
    assert all(json.loads(r.read_text())["status"] == "complete" for r in records)
    # the failed scene never gets a record that says complete: it is refused before any run folder
    assert not list(out.glob("enmap_potsdam_tile_bad/*/run.json"))
    stamps = {r: r.stat().st_mtime_ns for r in records}

    bad.unlink()
    second = sweep_archive(**kw)  # nothing failed: completes and returns the table
    assert second["processed"] == [] and second["failed"] == []
    assert [Path(p).name for p in second["skipped"]] == ["enmap_potsdam_tile_a.tif"]
    assert {r: r.stat().st_mtime_ns for r in records} == stamps  # nothing was rewritten
    assert sorted(out.glob("enmap_potsdam_tile_a/*/run.json")) == records

    # a crash after the outputs but before the commit marker (run.json is written last): the
    # restarted flow resumes from what the library left in the run folder (Prefect caches
    # nothing): the ingested scene, the committed tiles and the unmixer fit are reused, no model
    # runs again; only the blends, the outputs and the record are rewritten
    from flows.scene_flow import process_scene

    rec_a = records[0]
    run_dir = rec_a.parent
    rec = json.loads(rec_a.read_text())
    rec["status"] = "running"
    rec_a.write_text(json.dumps(rec))
    kept = {
        p: p.stat().st_mtime_ns
        for p in (run_dir / "_stages" / "ingest.json", run_dir / "unmix_fit" / ".hyperdeq_complete")
    }
    # keep_tiles is not part of the run's identity: the same run resumes, and drops its tiles when done
    state = process_scene(
        scene=str(next(small_archive.rglob("*_a.tif"))),
        out_dir=str(out),
        options=opts.model_copy(update={"keep_tiles": False}),
        return_state=True,
    )
    assert state.is_completed(), state
    assert Path(state.result()) == rec_a
    after = json.loads(rec_a.read_text())
    assert after["status"] == "complete" and after["run_id"] == rec["run_id"]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # ingest and fit reused, not redone
    model_stages = ["unmix", *(["denoise"] if opts.denoise else [])]
    for stage in model_stages:
        s = after["stages"][stage]
        assert s["n_tiles"] > 0 and s["n_reused"] == s["n_tiles"], (stage, s)
    assert not (run_dir / "tiles").exists()  # removed once complete (keep_tiles off)
    names = _task_states(state.state_details.flow_run_id)
    stages = ["ingest", "tile", "fit unmixer", "unmix", "blend unmix", "write", "record"]
    if opts.denoise:
        stages += ["denoise", "blend denoise", "tile unmix input"]
    for stage in stages:
        matching = [v for k, v in names.items() if k.startswith(stage + " ")]
        assert matching and all(v == "Completed" for v in matching), (stage, names)
    assert "Cached" not in names.values()  # no Prefect result caching: the library resumes


def _task_states(flow_run_id) -> dict[str, str]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def _read():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )

    return {t.name: t.state.name for t in asyncio.run(_read())}
