"""Typed records: each round-trips through its one JSON form, is frozen, and writes today's schema."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from pipeline import tiles as tstore
from pipeline.grid import plan_grid
from pipeline.records import FrozenMap, TileRecord
from pipeline.runner import _failed_records
from workers.stages import ModelSummary, StageSummary, load_stage, save_stage

OK_TILE = TileRecord(
    key="r00000_c00001",
    index=(0, 1),
    stage="denoise",
    status="ok",
    model="decsc",
    weights_sha256="ab" * 32,
    read=(0, 36, 28, 48),
    core=(0, 32, 32, 48),
    worker="host:1",
    wall_s=0.25,
    input_checksum="in",
    checksum="out",
    device="cpu",
    iterations=7,
    residual=1e-4,
    converged=True,
    stats={"guard_w": [0.1, 0.2], "guard_n": 12, "solver": {"method": "anderson", "m": (5, 6)}},
)
FAILED_TILE = TileRecord(
    key="r00001_c00000",
    index=(1, 0),
    stage="unmix",
    model="deq-unmix",
    read=(28, 48, 0, 36),
    core=(32, 48, 0, 32),
    worker="host:2",
    wall_s=0.5,
    input_checksum="in",
    error="RuntimeError: boom",
    traceback="Traceback ...",
)
MODEL_SUMMARY = ModelSummary(
    stage="denoise",
    path="/run/tiles/denoise.zarr",
    source="/run/tiles/input.zarr",
    model="decsc",
    weights_sha256=None,
    halo=4,
    channels=("b0", "b1"),
    wall_s=1.5,
    n_tiles=3,
    n_ok=2,
    failed=("r00001_c00000",),
    not_converged=(),
    n_reused=1,
    stats={"converged_pixels": 5, "valid_pixels": 6, "converged_pixel_fraction": 0.8333},
)
STAGE_SUMMARIES = (
    StageSummary(0.5, path="/run/ingest/scene.zarr", source="/data/scene.tif"),
    StageSummary(
        0.5, path="/run/tiles/input.zarr", stats={"grid": {"tile": 32}, "n_good_bands": 2}
    ),
    StageSummary(0.5, path="/run/_staging/denoised.zarr", stats={"band_guard": {"w": [0.5, 0.1]}}),
    StageSummary(0.5, stats={"outputs": {"denoised_tif": "denoised.tif"}}),
)
RECORDS: tuple[Any, ...] = (
    OK_TILE,
    FAILED_TILE,
    dataclasses.replace(OK_TILE, reused=True),
    *_failed_records(plan_grid((16, 16), 8, 2).tiles[:1], "denoise", "CancelledError: gone"),
    MODEL_SUMMARY,
    *STAGE_SUMMARIES,
)


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: type(r).__name__)
def test_round_trip_through_json(rec: Any) -> None:
    assert type(rec).from_json(rec.to_json()) == rec
    # through the bytes written to disk as well, and through pickle (records travel from workers)
    assert type(rec).from_json(json.loads(json.dumps(rec.to_json()))) == rec
    assert pickle.loads(pickle.dumps(rec)) == rec
    assert hash(rec) == hash(type(rec).from_json(rec.to_json()))


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: type(r).__name__)
def test_records_are_frozen(rec: Any) -> None:
    name = dataclasses.fields(rec)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(rec, name, "other")
    with pytest.raises(TypeError):
        rec.stats["added"] = 1  # type: ignore[index]
    assert isinstance(rec.stats, FrozenMap)


def test_nested_statistics_are_frozen_too() -> None:
    assert OK_TILE.stats["guard_w"] == (0.1, 0.2)
    assert isinstance(OK_TILE.stats["solver"], FrozenMap)
    with pytest.raises(AttributeError):
        OK_TILE.stats._d = {}  # type: ignore[attr-defined]


def test_tile_json_keeps_the_commit_marker_schema() -> None:
    task = {"key", "index", "stage", "status", "model", "weights_sha256", "read", "core", "worker"}
    report = {"device", "iterations", "residual", "converged", "stats"}
    assert set(OK_TILE.to_json()) == task | report | {"wall_s", "input_checksum", "checksum"}
    assert set(FAILED_TILE.to_json()) == task | {"wall_s", "input_checksum", "error", "traceback"}
    assert OK_TILE.to_json()["stats"] == {
        "guard_w": [0.1, 0.2],
        "guard_n": 12,
        "solver": {"method": "anderson", "m": [5, 6]},
    }
    assert RECORDS[3].to_json() == {
        "key": "r00000_c00000",
        "index": [0, 0],
        "stage": "denoise",
        "status": "failed",
        "error": "task failed: CancelledError: gone",
    }
    assert "reused" not in OK_TILE.to_json() and RECORDS[2].to_json()["reused"] is True
    # read access by JSON key, for callers written against the dict records
    assert OK_TILE["status"] == "ok" and OK_TILE.get("error") is None and "checksum" in OK_TILE


def test_written_tile_records_read_back_equal(tmp_path: Path) -> None:
    dest = tmp_path / "denoise.zarr"
    for rec in (OK_TILE, FAILED_TILE):
        tstore.write_record(dest, rec)
    assert tstore.load_records(dest) == {OK_TILE.key: OK_TILE, FAILED_TILE.key: FAILED_TILE}
    on_disk = json.loads((tstore.records_dir(dest) / f"{OK_TILE.key}.json").read_text())
    assert on_disk == OK_TILE.to_json()


def test_stage_summaries_save_and_load(tmp_path: Path) -> None:
    save_stage(tmp_path, "denoise", MODEL_SUMMARY)
    assert load_stage(tmp_path, "denoise") == MODEL_SUMMARY
    flat = json.loads((tmp_path / "_stages" / "denoise.json").read_text())
    assert flat["converged_pixels"] == 5 and flat["failed"] == ["r00001_c00000"]
    assert "stats" not in flat
    for i, s in enumerate(STAGE_SUMMARIES):
        save_stage(tmp_path, f"s{i}", s)
        assert load_stage(tmp_path, f"s{i}") == s
    assert json.loads((tmp_path / "_stages" / "s3.json").read_text()) == {
        "outputs": {"denoised_tif": "denoised.tif"},
        "wall_s": 0.5,
    }
    assert load_stage(tmp_path, "unmix") is None
