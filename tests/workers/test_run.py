"""End-to-end stages on a real EnMAP crop: outputs, provenance, resume, idempotence, failures."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import zarr

from pipeline import provenance as prov
from pipeline.config import RunConfig
from pipeline.hashing import sha256_file, sha256_tree
from pipeline.ingest import open_zarr_scene
from pipeline.writers import open_output
from tests.pipeline.test_tiles import write_crop_tif
from workers.denoise.options import DenoiseOptions
from workers.infer import IdentityTileModel
from workers.run import OUT_NAMES, Job, find_completed, plan_run, run_scene, verify_outputs
from workers.unmix.options import UnmixOptions

CFG = RunConfig(tile=32, halo=4)


@dataclass(frozen=True)
class FlakyIdentity:
    """Identity that fails on tiles of one read shape (same name/halo/hash as the identity model)."""

    fail_shape: tuple[int, int]
    halo: int = 0
    name: str = "identity"
    weights_sha256: str | None = None
    out_names: tuple[str, ...] | None = None

    def __call__(self, cube: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        if tuple(cube.shape[1:]) == self.fail_shape:
            raise RuntimeError(f"simulated worker crash on a {self.fail_shape} tile")
        return IdentityTileModel()(cube)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_crop_tif(tmp_path_factory.mktemp("scene") / "potsdam crop (real).tif")


def _job(out: Path, cfg: RunConfig = CFG, **kw: Any) -> Job:
    """Denoise only (the old ``unmix=False``), rooted at ``out``."""
    return Job(cfg.replace(out_root=out), **{"unmix": None, **kw})


def _run(scene: Path, out: Path, cfg: RunConfig = CFG, model: Any = None) -> Any:
    with ThreadPoolExecutor(2) as ex:
        return run_scene(
            scene, _job(out, cfg), cluster=ex, tile_models={"denoise": model or IdentityTileModel()}
        )


def _files(run_dir: Path) -> dict[str, bytes]:
    keep = ("denoised.zarr", "denoised.tif", "quicklook_rgb.png")
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
        and str(p.relative_to(run_dir)).startswith(keep)
        and not p.name.endswith("zarr.json")
    }


def _final_outputs(run_dir: Path) -> list[str]:
    """Every final-named output present in ``run_dir`` (a failed run must have none)."""
    return sorted(name for name in OUT_NAMES.values() if (run_dir / name).exists())


def _complete(run_dir: Path) -> bool:
    """The record says complete and every recorded output verifies (size, file count, sha256)."""
    return prov.load_run_record(run_dir)["status"] == "complete" and verify_outputs(run_dir) == []


def test_run_writes_named_georeferenced_outputs_and_a_complete_record(
    scene: Path, tmp_path: Path
) -> None:
    res = _run(scene, tmp_path)
    assert (
        res.status == "complete" and not res.reused and res.n_tiles == 3
    )  # one all-nodata tile skipped
    assert res.run_dir.parent.parent == tmp_path.resolve()
    assert res.run_dir.parent.name == "potsdam_crop_real"  # confined, sanitised scene name
    assert set(res.outputs) == {"denoised_zarr", "denoised_tif", "quicklook_rgb", "stac_item"}
    for p in res.outputs.values():
        assert p.exists() and p.parent == res.run_dir
    assert res.record == res.run_dir / "run.json"
    src = open_zarr_scene(res.run_dir / "ingest" / "scene.zarr")
    den = open_output(res.outputs["denoised_zarr"], "denoised")
    assert den.rio.crs == src.rio.crs and den.rio.transform() == src.rio.transform()
    np.testing.assert_array_equal(den["wavelength"].values, src["wavelength"].values)
    good = src["good_band"].values
    np.testing.assert_array_equal(den.values[good], src.values[good])  # identity model: exact
    assert np.isnan(den.values[~good]).all()
    with rasterio.open(res.outputs["denoised_tif"]) as f:
        assert f.crs == src.rio.crs and f.transform == src.rio.transform() and f.count == 224
        np.testing.assert_array_equal(f.read(10), src.values[9])
    rec = json.loads((res.run_dir / "run.json").read_text())
    assert rec["status"] == "complete" and rec["run_id"] == res.run_id
    assert rec["input"]["sha256"] == prov.sha256_path(scene)
    assert rec["models"][0]["name"] == "identity"
    # the record's config is the job: the run configuration plus each enabled model's options
    assert rec["config"]["config"]["tile"] == 32 and rec["config"]["config"]["halo"] == 4
    assert set(rec["config"]) == {"config", "denoise"}  # unmixing off: no unmix options
    assert rec["weights"] == {"identity": None}  # the tile model replaced DECSC (and its guard)
    assert len(rec["tiles"]["denoise"]) == 3
    assert json.loads((res.run_dir / "_stages" / "tile_input.json").read_text())["grid"][
        "skipped"
    ] == ["r00001_c00000"]
    t0 = rec["tiles"]["denoise"][0]
    assert t0["status"] == "ok" and t0["converged"] is True and t0["worker"] and t0["wall_s"] >= 0
    assert rec["failed_tiles"] == [] and rec["code_version"] and rec["packages"]["zarr"]
    # each output is recorded with its size, file count and sha256 (what reuse verifies)
    assert set(rec["outputs"]) == set(res.outputs)
    for key, entry in rec["outputs"].items():
        p = res.run_dir / entry["path"]
        assert entry["path"] == OUT_NAMES[key] and p == res.outputs[key]
        if p.is_dir():
            files = [f for f in p.rglob("*") if f.is_file()]
            assert entry["files"] == len(files) > 1 and entry["bytes"] == sum(
                f.stat().st_size for f in files
            )
            assert entry["sha256"] == sha256_tree(p)
        else:
            assert (
                entry["files"] == 1
                and entry["bytes"] == p.stat().st_size
                and entry["sha256"] == sha256_file(p)
            )
    attrs = zarr.open_group(str(res.outputs["denoised_zarr"]), mode="r").attrs
    assert attrs["hyperdeq_complete"] and attrs["hyperdeq_run"]["run_id"] == res.run_id
    stac = json.loads((res.run_dir / "stac_item.json").read_text())
    assert stac["properties"]["proj:code"] == "EPSG:32633" and "denoised_tif" in stac["assets"]
    assert 13.0 < stac["bbox"][0] < 13.2 and 52.3 < stac["bbox"][1] < 52.5
    # a completed run keeps no staging area, no lock and (without keep_tiles) no tile stores
    assert not (res.run_dir / "_staging").exists() and not (res.run_dir / ".hyperdeq.lock").exists()
    assert not (res.run_dir / "tiles").exists()


def test_keep_tiles_keeps_the_tile_stores_and_is_the_same_run(scene: Path, tmp_path: Path) -> None:
    kept = _run(scene, tmp_path, CFG.replace(keep_tiles=True))
    assert kept.status == "complete"
    assert {"input.zarr", "denoise.zarr"} <= {p.name for p in (kept.run_dir / "tiles").iterdir()}
    plain = plan_run(scene, _job(tmp_path), tile_models={"denoise": IdentityTileModel()})
    assert plain.run_id == kept.run_id  # keeping the tiles changes no number: not in the run id


def test_rerun_reuses_resume_is_byte_identical_and_config_change_is_a_new_run(
    scene: Path, tmp_path: Path
) -> None:
    cfg = CFG.replace(keep_tiles=True)  # the resume below needs the tile stores of the first run
    first = _run(scene, tmp_path, cfg)
    before = _files(first.run_dir)
    again = _run(scene, tmp_path, cfg)
    assert again.reused and again.run_dir == first.run_dir and again.run_id == first.run_id
    # simulate a crash after the tiles: the record and outputs are gone, the tile stores remain
    (first.run_dir / "run.json").unlink()
    for name in ("denoised.tif", "quicklook_rgb.png"):
        (first.run_dir / name).unlink()
    shutil.rmtree(first.run_dir / "denoised.zarr")
    resumed = _run(scene, tmp_path, cfg)
    assert not resumed.reused and resumed.run_dir == first.run_dir and resumed.status == "complete"
    tiles = json.loads((first.run_dir / "run.json").read_text())["tiles"]["denoise"]
    assert len(tiles) == 3
    summary = json.loads((first.run_dir / "_stages" / "denoise.json").read_text())
    assert summary["n_reused"] == 3  # no tile was recomputed
    assert _files(first.run_dir) == before  # byte-identical outputs
    other = _run(scene, tmp_path, cfg.replace(blend="crop"))
    assert other.run_id != first.run_id and other.run_dir != first.run_dir


def test_failed_tile_is_listed_never_complete_and_retried(scene: Path, tmp_path: Path) -> None:
    bad = _run(scene, tmp_path, model=FlakyIdentity(fail_shape=(20, 20)))
    assert bad.status == "failed" and bad.failed_tiles == ["denoise:r00001_c00001"]
    rec = json.loads((bad.run_dir / "run.json").read_text())
    assert rec["status"] == "failed" and rec["failed_tiles"] == ["denoise:r00001_c00001"]
    assert "1 tiles failed" in rec["error"] and "rerun the same command" in rec["error"]
    failed = [t for t in rec["tiles"]["denoise"] if t["status"] == "failed"]
    assert "simulated worker crash" in failed[0]["error"]
    plan = plan_run(scene, _job(tmp_path), tile_models={"denoise": IdentityTileModel()})
    assert plan.run_dir == bad.run_dir and find_completed(plan) is None
    # a failed run has no final-named output: they stay staged, and the record lists none
    assert bad.outputs == {} and rec["outputs"] == {} and _final_outputs(bad.run_dir) == []
    staged = bad.run_dir / "_staging" / "denoised.zarr"
    assert staged.is_dir() and (bad.run_dir / "_staging" / "denoised.tif").is_file()
    # the failed tile's core holds no data in the (staged) output (never silently filled)
    den = open_output(staged, "denoised").values
    assert np.isnan(den[:, 36:, 36:]).all()
    assert np.isfinite(
        den[open_zarr_scene(bad.run_dir / "ingest" / "scene.zarr")["good_band"].values][:, :32, :32]
    ).any()
    good = _run(scene, tmp_path)
    assert good.status == "complete" and good.run_dir == bad.run_dir
    summary = json.loads((good.run_dir / "_stages" / "denoise.json").read_text())
    assert summary["n_reused"] == 2 and summary["failed"] == []
    assert find_completed(plan) == good.run_dir
    assert np.isfinite(
        open_output(good.outputs["denoised_zarr"], "denoised").values[:, 36:, 36:]
    ).any()


def test_disk_full_in_a_stage_marks_the_run_failed_and_leaves_no_output_that_looks_complete(
    scene: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import workers.stages as ws
    from pipeline.errors import WriteError

    real = ws.quicklook_rgb

    def half_written(src: Any, bands: Any, dest: Path) -> Path:
        Path(dest).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(dest))

    monkeypatch.setattr(ws, "quicklook_rgb", half_written)
    with pytest.raises(
        WriteError,
        match=r"^\[Errno 28\] No space left on device: the write stage could "
        r"not write .*quicklook_rgb.*; check free space / permissions there, "
        r"then rerun the same command to resume",
    ):
        _run(scene, tmp_path)
    (run_dir,) = [p.parent for p in tmp_path.glob("*/*/run.json")]
    rec = prov.load_run_record(run_dir)
    assert rec["status"] == "failed" and rec["failed_stage"] == "write" and rec["outputs"] == {}
    assert "No space left on device" in rec["error"] and not _complete(run_dir)
    # the half-written file never got its final name, nor did any other output (they stay staged)
    assert (
        not (run_dir / "quicklook_rgb.png").exists()
        and not (run_dir / "_staging" / "quicklook_rgb.png").exists()
    )
    assert _final_outputs(run_dir) == [] and (run_dir / "_staging" / "denoised.tif").is_file()
    assert not list(run_dir.rglob(".*.tmp*"))
    assert not (run_dir / ".hyperdeq.lock").exists()  # the lock is released on failure
    monkeypatch.setattr(ws, "quicklook_rgb", real)
    res = _run(scene, tmp_path)  # the same command resumes
    assert res.status == "complete" and res.run_dir == run_dir and _complete(run_dir)
    assert (run_dir / "quicklook_rgb.png").is_file() and not (run_dir / "_staging").exists()


class _LostScheduler(ThreadPoolExecutor):
    """Model tasks come back cancelled, as a distributed client cancels them when its scheduler dies."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        from concurrent.futures import Future

        from pipeline.runner import process_batch

        if fn is process_batch:
            f: Future[Any] = Future()
            f.cancel()
            f.set_running_or_notify_cancel()
            return f
        return super().submit(fn, *args, **kwargs)


def test_lost_cluster_stops_before_blending_and_marks_the_run_failed(
    scene: Path, tmp_path: Path
) -> None:
    from pipeline.errors import ClusterError

    with (
        _LostScheduler(2) as ex,
        pytest.raises(
            ClusterError,
            match=r"during the denoise stage .*rerun the same "
            r"command to resume",
        ),
    ):
        run_scene(scene, _job(tmp_path), cluster=ex, tile_models={"denoise": IdentityTileModel()})
    (run_dir,) = [p.parent for p in tmp_path.glob("*/*/run.json")]
    rec = prov.load_run_record(run_dir)
    assert (
        rec["status"] == "failed"
        and rec["failed_stage"] == "denoise"
        and "ClusterError" in rec["error"]
    )
    assert not (run_dir / "denoised.zarr").exists()  # never blended
    assert not (run_dir / "_staging" / "denoised.zarr").exists()
    assert _run(scene, tmp_path).status == "complete"


def test_lost_scheduler_error_names_the_scheduler(scene: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from pipeline.errors import ClusterError
    from workers.run import classify_error, end_record

    plan = plan_run(scene, _job(tmp_path), tile_models={"denoise": IdentityTileModel()})
    client = SimpleNamespace(
        status="connecting", scheduler=SimpleNamespace(address="tcp://10.0.0.7:8786")
    )
    err = classify_error(
        plan.run_dir, "blend_denoise", RuntimeError("cancelled for reason: unknown"), client
    )
    assert isinstance(err, ClusterError)
    assert "lost the Dask scheduler at tcp://10.0.0.7:8786 during the blend_denoise stage" in str(
        err
    )
    plan.run_dir.mkdir(parents=True)
    end_record(plan, "t", "blend_denoise", err)
    rec = prov.load_run_record(plan.run_dir)
    assert rec["status"] == "failed" and rec["failed_stage"] == "blend_denoise"
    assert rec["error"].startswith("ClusterError: lost the Dask scheduler at tcp://10.0.0.7:8786")


@pytest.mark.slow
def test_unmix_stage_on_the_denoised_cube(tmp_path: Path) -> None:
    scene = write_crop_tif(
        tmp_path / "valid_crop.tif", 0, 0, 48, 48
    )  # fully valid: the fit samples windows
    job = Job(
        RunConfig(out_root=tmp_path / "out", tile=32, halo=4),
        unmix=UnmixOptions(endmembers=3, epochs=2),
    )
    with ThreadPoolExecutor(2) as ex:
        res = run_scene(scene, job, cluster=ex, tile_models={"denoise": IdentityTileModel()})
    assert res.status == "complete"
    for key in (
        "abundances_zarr",
        "abundances_tif",
        "rmse_tif",
        "endmembers_csv",
        "endmembers_json",
        "quicklook_abundances",
        "denoised_zarr",
    ):
        assert res.outputs[key].exists(), key
    ab = open_output(res.outputs["abundances_zarr"], "abundances")
    assert ab.sizes["endmember"] == 3 and ab.rio.crs.to_epsg() == 32633
    src = open_zarr_scene(res.run_dir / "ingest" / "scene.zarr")
    valid = np.isfinite(src.values[src["good_band"].values]).all(axis=0)
    a = ab.values
    assert np.isnan(a[:, ~valid]).all()
    np.testing.assert_allclose(a[:, valid].sum(axis=0), 1.0, atol=1e-3)
    assert (a[:, valid] >= -1e-6).all()
    rm = open_output(res.outputs["abundances_zarr"], "rmse").values
    assert np.isfinite(rm[valid]).all() and np.isnan(rm[~valid]).all()
    rec = json.loads((res.run_dir / "run.json").read_text())
    assert [m["name"] for m in rec["models"]] == ["identity", "deq-unmix"]
    assert rec["config"]["unmix"] == {"endmembers": 3, "epochs": 2}
    assert len(rec["tiles"]["unmix"]) == 4
    assert open(res.outputs["endmembers_csv"]).readline().startswith("wavelength_nm,")


@pytest.mark.slow
def test_full_size_denoiser_is_chosen_by_config_and_recorded(tmp_path: Path) -> None:
    """``DenoiseOptions(arch="full")`` runs the full-size weights end to end (real DECSC, no model
    passed in): a new run id, the full weights' sha256 in the record, a different (finite) output."""
    from workers.denoise.spec import FULL_WEIGHTS_SHA256
    from workers.registry import get_spec

    scene = write_crop_tif(tmp_path / "valid_crop.tif", 0, 0, 24, 24)
    cfg = RunConfig(out_root=tmp_path / "out", tile=16, halo=4)
    runs = {}
    for arch in ("shipped", "full"):
        with ThreadPoolExecutor(1) as ex:
            runs[arch] = run_scene(
                scene, Job(cfg, denoise=DenoiseOptions(arch=arch), unmix=None), cluster=ex
            )
        assert runs[arch].status == "complete"
    assert runs["shipped"].run_dir != runs["full"].run_dir
    shas = {
        a: json.loads((r.run_dir / "run.json").read_text())["models"][0]["weights_sha256"]
        for a, r in runs.items()
    }
    assert shas == {"shipped": get_spec("decsc").weights_sha256, "full": FULL_WEIGHTS_SHA256}
    a, b = (open_output(r.outputs["denoised_zarr"], "denoised").values for r in runs.values())
    good = np.isfinite(a).all(axis=(1, 2))
    assert good.sum() > 200 and np.isfinite(b[good]).all()
    assert not np.allclose(a[good], b[good], atol=1e-4)
    # the band guard ran on every tile and is recorded with its sha256
    from workers.denoise.spec import GUARD_WEIGHTS_SHA256

    rec = json.loads((runs["shipped"].run_dir / "run.json").read_text())
    assert rec["weights"] == {
        "decsc": get_spec("decsc").weights_sha256,
        "decsc-guard": GUARD_WEIGHTS_SHA256,
    }
    bg = rec["models"][0]["band_guard"]
    assert bg["sha256"] == GUARD_WEIGHTS_SHA256 and len(bg["w"]) == good.sum()
    w_scene = np.asarray(bg["w"], dtype=np.float32)
    assert 0.0 <= w_scene.min() and w_scene.max() <= 1.0
    assert all(
        t["guard"] is True and 0.0 <= t["guard_w_mean"] <= t["guard_w_max"] <= 1.0
        for t in rec["tiles"]["denoise"]
    )
    # the arithmetic each tile ran in is recorded (issue 22 item 3)
    assert {t["precision"] for t in rec["tiles"]["denoise"]} == {"float32"}
    # the spectral-subspace pass (default k = 8) is configured and each tile says what it did:
    # these tiles (≤ 400 px of 218 bands) are too small to estimate a subspace, so it was skipped
    assert rec["config"]["denoise"]["subspace"] == 8
    assert all(
        t["subspace_k"] == 0 and "218 bands" in t["subspace_skipped"]
        for t in rec["tiles"]["denoise"]
    )
    # without the guard: another run id, no guard in the record, the model's own output
    with ThreadPoolExecutor(1) as ex:
        plain = run_scene(
            scene, Job(cfg, denoise=DenoiseOptions(guard=False), unmix=None), cluster=ex
        )
    assert plain.status == "complete" and plain.run_dir != runs["shipped"].run_dir
    rec = json.loads((plain.run_dir / "run.json").read_text())
    assert "band_guard" not in rec["models"][0] and rec["config"]["denoise"]["guard"] is False
    assert "decsc-guard" not in rec["weights"]
    assert all(t["guard"] is False for t in rec["tiles"]["denoise"])
    c = open_output(plain.outputs["denoised_zarr"], "denoised").values
    assert not np.allclose(a[good], c[good], atol=1e-6)
    # the guard is one weight per band for the whole scene, applied as the tiles are blended:
    # guarded = model + w (input − model), exactly, with the model's output from the plain run
    from workers.run import INGESTED

    inp = open_zarr_scene(runs["shipped"].run_dir / INGESTED).values[good]
    np.testing.assert_allclose(
        a[good], c[good] + w_scene[:, None, None] * (inp - c[good]), atol=2e-6
    )


def test_unknown_denoiser_is_refused() -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown denoiser 'huge'"):
        DenoiseOptions(arch="huge")


def test_nothing_to_do_is_refused() -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="nothing to do"):
        Job(CFG, denoise=None, unmix=None)
