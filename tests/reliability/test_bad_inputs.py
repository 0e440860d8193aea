"""Bad-input catalogue: one parametrised test, each case an input built at test time from real data.

Every case names the call it makes (the public entry point a user would reach), the error class
it must raise and a fragment of the message (which must show the offending value and the fix).
Cases marked ``accepted`` are inputs that are unusual but legal: they must go through and the
test checks what came out.

A second catalogue runs ``hyperdeq`` itself in a subprocess (issue 21 items 9, 10, 11): each
command line must exit with status 2 and one ``error:`` line naming the value and the fix, show no
traceback, and be refused before any Dask cluster starts and before any run record is written;
the time to refuse is recorded (not asserted: the test machine is shared).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import scipy.io

from pipeline.config import RunConfig
from pipeline.errors import (
    ConfigError,
    InputValidationError,
    ModelError,
    ReadError,
    UnknownFormatError,
    WeightsError,
)
from pipeline.scene import MissingCRSWarning
from tests.reliability._data import BERLIN, PAVIA, crop_geotiff, read_cube


@dataclass(frozen=True)
class Bad:
    """One catalogue entry: ``make(tmp, crop)`` returns the zero-argument call to try."""

    what: str
    make: Callable[[Path, Path], Callable[[], Any]]
    error: type[BaseException] | None  # None: accepted (the call's result is checked by ``check``)
    match: str = ""
    check: Callable[[Any], None] | None = None


# ------------------------------------------------------------------------------- builders
def _write_tif(dest: Path, cube: np.ndarray, profile: dict, **changes: Any) -> Path:
    p = {**profile, "count": cube.shape[0], "dtype": str(cube.dtype), **changes}
    with rasterio.open(dest, "w", **p) as d:
        d.write(cube)
    return dest


def _write_envi(
    dest: Path,
    cube: np.ndarray,
    *,
    byte_order: int = 0,
    header_byte_order: int | None = None,
    wavelength: list[float] | None = None,
    lines: int | None = None,
) -> Path:
    """A minimal BSQ ENVI file (binary + ``.hdr``) holding ``cube`` (band, y, x) float32."""
    raw = np.ascontiguousarray(cube.astype(">f4" if byte_order else "<f4"))
    dest.write_bytes(raw.tobytes())
    nb, ny, nx = cube.shape
    hdr = [
        "ENVI",
        f"samples = {nx}",
        f"lines = {ny if lines is None else lines}",
        f"bands = {nb}",
        "header offset = 0",
        "file type = ENVI Standard",
        "data type = 4",
        "interleave = bsq",
        f"byte order = {byte_order if header_byte_order is None else header_byte_order}",
    ]
    if wavelength is not None:
        hdr += [
            "wavelength units = Nanometers",
            "wavelength = {" + ", ".join(f"{w:g}" for w in wavelength) + "}",
        ]
    Path(str(dest) + ".hdr").write_text("\n".join(hdr) + "\n")
    return dest


def _crop_cube(crop: Path) -> tuple[np.ndarray, dict, list[float]]:
    cube, prof = read_cube(crop)
    with rasterio.open(crop) as s:
        wl = [float(s.tags(i)["wavelength"]) for i in range(1, s.count + 1)]
    return cube, prof, wl


def _open(p: Path, **kw: Any) -> Callable[[], Any]:
    from pipeline.readers import open_scene

    return lambda: open_scene(p, **kw)


def _ingest(src: Path, tmp: Path) -> Callable[[], Any]:
    from pipeline.ingest import ingest_scene

    return lambda: ingest_scene(src, tmp / "ingested.zarr")


def truncated_tif(tmp: Path, crop: Path) -> Callable[[], Any]:
    p = tmp / "truncated.tif"
    p.write_bytes(crop.read_bytes()[: crop.stat().st_size // 2])
    return _ingest(p, tmp)


def envi_size_mismatch(tmp: Path, crop: Path) -> Callable[[], Any]:
    cube, _, wl = _crop_cube(crop)
    p = _write_envi(tmp / "scene.bsq", cube, wavelength=wl)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 4096)
    return _open(p)


def envi_wrong_byte_order(tmp: Path, crop: Path) -> Callable[[], Any]:
    cube, _, wl = _crop_cube(crop)
    return _open(_write_envi(tmp / "scene.bsq", cube / 10000, wavelength=wl, header_byte_order=1))


def inf_in_data(tmp: Path, crop: Path) -> Callable[[], Any]:
    cube, prof, _ = _crop_cube(crop)
    cube[3, 10:12, 20:22] = np.inf
    return _ingest(_write_tif(tmp / "inf.tif", cube, prof), tmp)


def nan_in_data(tmp: Path, crop: Path) -> Callable[[], Any]:
    cube, prof, _ = _crop_cube(crop)
    cube[:, 5:9, 5:9] = np.nan  # NaN is nodata by convention: accepted, pixels become invalid
    src = _write_tif(tmp / "nan.tif", cube, prof)
    from pipeline.ingest import ingest_scene, open_zarr_scene

    return lambda: open_zarr_scene(ingest_scene(src, tmp / "nan.zarr"))


def _check_nan(scene: Any) -> None:
    from pipeline.scene import valid_mask

    v = np.asarray(valid_mask(scene).values)
    assert v.shape == (64, 64) and not v[5:9, 5:9].any() and v.sum() == 64 * 64 - 16


def all_nodata(tmp: Path, crop: Path) -> Callable[[], Any]:
    cube, prof, _ = _crop_cube(crop)
    cube[:] = prof["nodata"]
    return _ingest(_write_tif(tmp / "empty.tif", cube, prof), tmp)


def too_many_endmembers(tmp: Path, crop: Path) -> Callable[[], Any]:
    from pipeline.readers import open_scene
    from workers.unmix.fit import fit_scene

    cube, prof, _ = _crop_cube(crop)
    src = _write_tif(tmp / "few_bands.tif", cube[:3], prof)  # a 3-band cut of the real scene
    scene = open_scene(src).load()
    return lambda: fit_scene(scene, n_endmembers=5, max_epochs=1)


def endmember_set_band_mismatch(tmp: Path, crop: Path) -> Callable[[], Any]:
    from pipeline.readers import open_scene
    from workers.unmix.fit import apply_fit, fit_scene

    scene = open_scene(crop_geotiff(tmp / "small.tif", size=16)).load()
    fit = fit_scene(scene, 3, max_epochs=1, fit_tiles=1, fit_tile_size=16, sample_pixels=200)
    cube = np.asarray(scene.values)[:39]  # a tile of another sensor setup: one band fewer
    return lambda: apply_fit(fit, cube)


def wavelengths_count_mismatch(tmp: Path, crop: Path) -> Callable[[], Any]:
    cube, _, wl = _crop_cube(crop)
    return _open(_write_envi(tmp / "scene.bsq", cube, wavelength=wl[:-1]))


def wavelengths_not_increasing(tmp: Path, crop: Path) -> Callable[[], Any]:
    cube, _, wl = _crop_cube(crop)
    wl = list(wl)
    wl[11] = wl[10]  # a duplicated wavelength (a reversed/swapped list is reordered, not refused)
    return _open(_write_envi(tmp / "scene.bsq", cube, wavelength=wl))


def zero_size(tmp: Path, crop: Path) -> Callable[[], Any]:
    cube, _, wl = _crop_cube(crop)
    return _open(_write_envi(tmp / "scene.bsq", cube[:, :0, :], wavelength=wl))


def one_band(tmp: Path, crop: Path) -> Callable[[], Any]:
    cube, prof, _ = _crop_cube(crop)
    return _ingest(_write_tif(tmp / "one.tif", cube[:1], prof), tmp)


def scale_overflow(tmp: Path, crop: Path) -> Callable[[], Any]:
    from pipeline.readers import open_scene

    # real int16 EnMAP; raw / 1e-36 overflows float32 (detected when the pixels are read)
    return lambda: open_scene(BERLIN, scale_factor=1e-36).load()


def mat_without_variable(tmp: Path, crop: Path) -> Callable[[], Any]:
    cube, _, _ = _crop_cube(crop)
    p = tmp / "scene.mat"
    scipy.io.savemat(p, {"cube": np.moveaxis(cube, 0, -1), "notes": np.array([1.0, 2.0])})
    return _open(p, variable="Y")


def mat_no_cube(tmp: Path, crop: Path) -> Callable[[], Any]:
    p = tmp / "pavia_meta.mat"
    data = scipy.io.loadmat(PAVIA)
    scipy.io.savemat(
        p, {k: np.asarray(v).ravel()[:10] for k, v in data.items() if not k.startswith("__")}
    )
    return _open(p)


def foreign_zarr_no_crs(tmp: Path, crop: Path) -> Callable[[], Any]:
    import xarray as xr

    cube, _, wl = _crop_cube(crop)
    ds = xr.Dataset(
        {"reflectance": (("band", "y", "x"), cube / 10000)}, coords={"wavelength": ("band", wl)}
    )
    p = tmp / "other_tool.zarr"
    ds.to_zarr(p, zarr_format=3, consolidated=False)
    return _open(p)


def nonexistent(tmp: Path, crop: Path) -> Callable[[], Any]:
    return _ingest(tmp / "archive" / "2023" / "missing_scene.tif", tmp)


def directory_as_file(tmp: Path, crop: Path) -> Callable[[], Any]:
    (tmp / "scenes").mkdir()
    return _ingest(tmp / "scenes", tmp)


def unknown_format(tmp: Path, crop: Path) -> Callable[[], Any]:
    p = tmp / "scene.xyz"
    p.write_bytes(b"\x00\x01" + crop.read_bytes()[100:2000])
    return _open(p)


def pattern_matches_nothing(tmp: Path, crop: Path) -> Callable[[], Any]:
    from flows.sweep import scan_archive  # the sweep's discovery step

    (tmp / "archive").mkdir()
    crop_geotiff(tmp / "archive" / "enmap_tile_0_0.tif")
    return lambda: scan_archive(tmp / "archive", patterns=["**/PRS_L2D_*.he5"])


def _config(**kw: Any) -> Callable[[Path, Path], Callable[[], Any]]:
    return lambda tmp, crop: lambda: RunConfig(out_root=tmp, **kw)


def nothing_to_do(tmp: Path, crop: Path) -> Callable[[], Any]:
    from workers.run import Job

    return lambda: Job(RunConfig(out_root=tmp), denoise=None, unmix=None)


def workers_and_scheduler(tmp: Path, crop: Path) -> Callable[[], Any]:
    from workers.cluster import ClusterSpec

    return lambda: ClusterSpec(n_workers=2, address="tcp://127.0.0.1:8786")


def out_root_named_like_dev(tmp: Path, crop: Path) -> Callable[[], Any]:
    from workers.run import _check_out_root

    if not os.access("/", os.W_OK):
        pytest.skip("needs a writable / to probe a top-level folder")
    # a folder whose name only starts with "dev"/"sys"/"proc" is an ordinary folder (nothing is created)
    return lambda: [
        _check_out_root(Path(p)) for p in ("/devices-data/out", "/system-out/x", "/processed/out")
    ]


def tile_over_memory_budget(tmp: Path, crop: Path) -> Callable[[], Any]:
    from workers.denoise.options import DenoiseOptions
    from workers.infer import IdentityTileModel
    from workers.run import Job, run_scene

    # DECSC's band-independent part (~345 MiB for the 64x64 px read window: tile 48 + halo 8 each
    # side) fits the budget alone; the 40 bands add ~8 MiB of input, output and blending buffers:
    # refused when the run is planned from the scene's header, before any pixel is read or any
    # cluster starts
    job = Job(
        RunConfig(out_root=tmp / "out", tile=48, halo=8, tile_memory_mb=350.0),
        denoise=DenoiseOptions(subspace=0),
        unmix=None,
    )

    def call() -> Any:
        with ThreadPoolExecutor(1) as ex:
            return run_scene(crop, job, ex, tile_models={"denoise": IdentityTileModel()})

    return call


def _decsc_file(tmp: Path, *, model: str = "decsc", tamper: bool = False) -> Path:
    """A structurally valid DECSC safetensors file (untrained weights) with the loader's metadata."""
    from safetensors.torch import save_file

    from workers.denoise.api import build_model, weights_metadata

    m = build_model()
    meta = weights_metadata(m)
    meta["model"] = model
    state = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    p = tmp / "decsc.safetensors"
    save_file(state, str(p), metadata=meta)
    if tamper:
        data = bytearray(p.read_bytes())
        data[-100] ^= 0x55  # one byte of the last tensor
        p.write_bytes(bytes(data))
    return p


def weights_tampered_registry(tmp: Path, crop: Path) -> Callable[[], Any]:
    import workers.registry as reg

    (tmp / "orig").mkdir()
    good_sha = reg.sha256_file(_decsc_file(tmp / "orig"))
    _decsc_file(tmp, tamper=True)  # same file, one byte changed, in the "installed" folder
    spec = reg.get_spec("decsc")
    ref = dataclasses.replace(
        spec.weights_ref(), sha256=good_sha
    )  # the registry expects the untampered file
    spec = dataclasses.replace(spec, weights={**spec.weights, spec.default_weights: ref})

    def call() -> Any:
        old = reg.WEIGHTS_DIR
        reg.WEIGHTS_DIR = tmp
        try:
            return reg.verified_weights_path(spec)
        finally:
            reg.WEIGHTS_DIR = old

    return call


def weights_tampered_content(tmp: Path, crop: Path) -> Callable[[], Any]:
    from workers.denoise.api import load_denoiser

    p = _decsc_file(tmp, tamper=True)
    return lambda: load_denoiser("cpu", weights=p)


def weights_other_model(tmp: Path, crop: Path) -> Callable[[], Any]:
    from workers.denoise.api import load_denoiser

    p = _decsc_file(tmp, model="deq-unmix")
    return lambda: load_denoiser("cpu", weights=p)


def weights_truncated(tmp: Path, crop: Path) -> Callable[[], Any]:
    from workers.denoise.api import load_denoiser

    p = _decsc_file(tmp)
    p.write_bytes(p.read_bytes()[:5000])
    return lambda: load_denoiser("cpu", weights=p)


def unknown_model(tmp: Path, crop: Path) -> Callable[[], Any]:
    from workers.registry import get_spec

    return lambda: get_spec("decsc-v2")


CATALOGUE: dict[str, Bad] = {
    "truncated-geotiff": Bad(
        "GeoTIFF cut to half its size", truncated_tif, ReadError, r"corrupt or truncated"
    ),
    "envi-size-mismatch": Bad(
        "ENVI binary 4 KiB shorter than its header says",
        envi_size_mismatch,
        ReadError,
        r"bytes but its header .* implies .*truncated or the header is wrong",
    ),
    "envi-wrong-byte-order": Bad(
        "ENVI little-endian data, header says byte order = 1",
        envi_wrong_byte_order,
        InputValidationError,
        r"byte-swapped.*'byte order = 1'",
    ),
    "inf-in-data": Bad(
        "+Inf values in 4 pixels of one band",
        inf_in_data,
        InputValidationError,
        r"infinite value inf in '.*inf\.tif' at band 3, row 10, col 20.*Mask them as nodata",
    ),
    "nan-in-data": Bad(
        "NaN in a 4x4 block (NaN is the nodata convention)",
        nan_in_data,
        None,
        "accepted: those 16 pixels invalid, the rest valid",
        _check_nan,
    ),
    "all-nodata": Bad(
        "every pixel at the nodata value -32768",
        all_nodata,
        InputValidationError,
        r"all-nodata scene",
    ),
    "bands-fewer-than-endmembers": Bad(
        "3-band scene asked for 5 endmembers",
        too_many_endmembers,
        ConfigError,
        r"5 endmembers cannot be extracted from .* 3 bands; lower n_endmembers",
    ),
    "endmember-set-band-mismatch": Bad(
        "unmixer fitted on 40 bands applied to a 39-band tile",
        endmember_set_band_mismatch,
        InputValidationError,
        r"with the fit's 40 good bands, got shape \(39, 16, 16\)",
    ),
    "wavelength-count-mismatch": Bad(
        "ENVI header lists 39 wavelengths for 40 bands",
        wavelengths_count_mismatch,
        InputValidationError,
        r"wavelength has 39 values but the cube has 40 bands",
    ),
    "wavelengths-not-increasing": Bad(
        "band 11 has the same wavelength as band 10",
        wavelengths_not_increasing,
        InputValidationError,
        r"wavelengths must be strictly increasing; band 11",
    ),
    "zero-size": Bad(
        "ENVI raster with 0 lines",
        zero_size,
        InputValidationError,
        r"zero-size raster: shape \(band, y, x\) = \(40, 0, 64\)",
    ),
    "one-band": Bad(
        "1-band GeoTIFF cut from the scene",
        one_band,
        InputValidationError,
        r"at least 2 bands, got 1",
    ),
    "scale-overflow": Bad(
        "int16 EnMAP read with scale_factor=1e-36",
        scale_overflow,
        InputValidationError,
        r"overflow while scaling .* becomes infinite in float32 with scale factor 1e-36",
    ),
    "mat-missing-variable": Bad(
        ".mat without the requested variable 'Y'",
        mat_without_variable,
        InputValidationError,
        r"variable 'Y' not found in .*variables: .*cube",
    ),
    "mat-no-cube": Bad(
        ".mat holding only 1-D metadata vectors",
        mat_no_cube,
        InputValidationError,
        r"no hyperspectral cube found in",
    ),
    "foreign-zarr-no-crs": Bad(
        "zarr written by plain xarray (no CRS, no hyperdeq marker)",
        foreign_zarr_no_crs,
        MissingCRSWarning,
        r"has no CRS: it will be processed, but outputs cannot be georeferenced",
    ),
    "nonexistent-path": Bad(
        "a path that does not exist",
        nonexistent,
        ReadError,
        r"input file not found: '.*missing_scene\.tif'",
    ),
    "directory-as-file": Bad(
        "a plain directory given as the scene",
        directory_as_file,
        ReadError,
        r"is a directory, not a scene file",
    ),
    "unknown-format": Bad(
        "bytes of no known format named .xyz",
        unknown_format,
        UnknownFormatError,
        r"unknown scene format for .*'\.xyz'",
    ),
    "archive-pattern-matches-nothing": Bad(
        "sweep pattern '**/PRS_L2D_*.he5' over an archive of GeoTIFFs",
        pattern_matches_nothing,
        ConfigError,
        r"pattern '\*\*/PRS_L2D_\*\.he5' matches no file under",
    ),
    "config-halo-ge-tile": Bad(
        "halo 64 with tile 64",
        _config(tile=64, halo=64),
        ConfigError,
        r"halo 64 must be smaller than the tile 64",
    ),
    "config-negative-tile": Bad(
        "tile -32", _config(tile=-32), ConfigError, r"tile must be a positive integer, got -32"
    ),
    "config-unknown-blend": Bad(
        "blend window 'gaussian'",
        _config(blend="gaussian"),
        ConfigError,
        r"unknown blend window 'gaussian'; choose one of",
    ),
    "config-nothing-to-do": Bad(
        "denoise and unmix both off", nothing_to_do, ConfigError, r"nothing to do"
    ),
    "config-workers-and-scheduler": Bad(
        "workers=2 and scheduler=tcp://... together",
        workers_and_scheduler,
        ConfigError,
        r"give either a scheduler address \('tcp://127\.0\.0\.1:8786'\) "
        r"or a cluster to start \(workers=2, .*not both",
    ),
    "out-root-named-like-dev": Bad(
        "output roots /devices-data, /system-out, /processed (not /dev, /sys, /proc)",
        out_root_named_like_dev,
        None,
        "accepted: not taken for system file systems",
        lambda out: None if out == [None, None, None] else pytest.fail(repr(out)),
    ),
    "tile-over-memory-budget": Bad(
        "64x64 px read window of 40 bands with a 350 MiB per-tile budget",
        tile_over_memory_budget,
        ConfigError,
        r"64x64 px tile of 40 bands needs about 353 MiB \(io 8 MiB, decsc 345 MiB\), "
        r"over the per-tile memory budget of 350\.0 MiB",
    ),
    "weights-hash-mismatch": Bad(
        "installed decsc.safetensors one byte changed (sha256 differs from the registry)",
        weights_tampered_registry,
        WeightsError,
        r"has sha256 '[0-9a-f]{64}' but model 'decsc' expects",
    ),
    "weights-tensor-tampered": Bad(
        "safetensors tensor bytes changed, metadata digest kept",
        weights_tampered_content,
        WeightsError,
        r"tensor contents do not match the digest",
    ),
    "weights-other-model": Bad(
        "safetensors written for model 'deq-unmix' given to DECSC",
        weights_other_model,
        WeightsError,
        r"is for model 'deq-unmix', not 'decsc'",
    ),
    "weights-truncated": Bad(
        "safetensors file cut to 5000 bytes",
        weights_truncated,
        WeightsError,
        r"cannot read weights file .* as safetensors",
    ),
    "unknown-model": Bad(
        "model name 'decsc-v2'",
        unknown_model,
        ModelError,
        r"unknown model 'decsc-v2'; valid models are \['decsc', 'deq-unmix'\]",
    ),
}


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_bad_input(name: str, case: Any, demo_crop: Path, tmp_path: Path) -> None:
    bad = CATALOGUE[name]
    expected = (
        ("accepted: " + bad.match)
        if bad.error is None
        else f"{bad.error.__name__} matching /{bad.match}/"
    )
    case("bad input", f"{name}: {bad.what}", expected)
    call = bad.make(tmp_path, demo_crop)
    if bad.error is None:
        out = call()
        assert bad.check is not None
        bad.check(out)
        case.measure(result="accepted and checked")
    elif issubclass(bad.error, Warning):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with pytest.warns(bad.error, match=bad.match):
                call()
        case.measure(result=f"{bad.error.__name__} raised as a warning")
    else:
        t0 = time.perf_counter()
        with pytest.raises(bad.error, match=bad.match) as info:
            call()
        msg = str(info.value)
        case.measure(
            raised=type(info.value).__name__,
            raise_s=round(time.perf_counter() - t0, 3),
            message=msg[:140] + ("…" if len(msg) > 140 else ""),
        )
    if bad.error is not None and not issubclass(bad.error, Warning):
        complete = [
            p
            for p in tmp_path.rglob("run.json")
            if json.loads(p.read_text()).get("status") == "complete"
        ]
        complete += [
            p
            for p in tmp_path.rglob("*.zarr")
            if p.name != "scene.zarr"
            and (p / "zarr.json").is_file()
            and json.loads((p / "zarr.json").read_text())
            .get("attributes", {})
            .get("hyperdeq_complete")
        ]
        case.measure(complete_marked=len(complete))
        assert not complete, f"a refused input left output that looks complete: {complete}"


# ------------------------------------------------------------------------------- the command line
@dataclass(frozen=True)
class Cli:
    """A command line: ``hyperdeq ARGS``, behind ``prefix`` (e.g. a private read-only mount), with ``env``."""

    args: list[str]
    prefix: tuple[str, ...] = ()
    env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class CliBad:
    """A command line that must be refused before any work (issue 21 items 9, 10, 11)."""

    what: str
    make: Callable[[Path, Path], Cli]
    match: str
    item: str


def _run(scene: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(scene), "--out", str(out), "--no-unmix", *extra]


def _scheduler(address: str) -> Callable[[Path, Path], Cli]:
    return lambda tmp, crop: Cli(_run(crop, tmp / "out", "--scheduler", address))


def cli_scheduler_unreachable(tmp: Path, crop: Path) -> Cli:
    from tests.reliability._helpers import free_port

    return Cli(_run(crop, tmp / "out", "--scheduler", f"tcp://127.0.0.1:{free_port()}"))


def cli_out_under_file(tmp: Path, crop: Path) -> Cli:
    (tmp / "notes.txt").write_text("a regular file\n")
    return Cli(_run(crop, tmp / "notes.txt" / "out"))


def cli_out_read_only(tmp: Path, crop: Path) -> Cli:
    ro = tmp / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        return Cli(_run(crop, ro / "out"))
    # root writes through permission bits: a read-only file system it is, mounted in a private
    # mount namespace that disappears with the command
    if (
        not shutil.which("unshare")
        or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode
    ):
        pytest.skip("running as root without `unshare -m`: cannot make a read-only folder")
    return Cli(
        _run(crop, ro / "out"),
        prefix=(
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount -t tmpfs -o ro,size=64k tmpfs "$0" && exec "$@"',
            str(ro),
        ),
    )


def cli_recipe_wrong_type(tmp: Path, crop: Path) -> Cli:
    (tmp / "recipe.yaml").write_text('cluster:\n  n_workers: "two"\n')
    return Cli(_run(crop, tmp / "out", "--recipe", str(tmp / "recipe.yaml")))


def cli_sweep_missing_scene(tmp: Path, crop: Path) -> Cli:
    (tmp / "scenes.txt").write_text(f"{crop}\nmissing_scene.tif\n")
    return Cli(
        ["sweep", "--list-file", str(tmp / "scenes.txt"), "--out", str(tmp / "out"), "--no-unmix"]
    )


def cli_device_cuda(tmp: Path, crop: Path) -> Cli:
    return Cli(_run(crop, tmp / "out", "--device", "cuda"), env={"CUDA_VISIBLE_DEVICES": ""})


def cli_endmembers_500(tmp: Path, crop: Path) -> Cli:
    return Cli(["run", str(crop), "--out", str(tmp / "out"), "--endmembers", "500"])


def _small(size: tuple[int, int]) -> Callable[[Path, Path], Cli]:
    return lambda tmp, crop: Cli(
        _run(crop_geotiff(tmp / f"scene_{size[0]}x{size[1]}.tif", size=size), tmp / "out")
    )


CLI_CATALOGUE: dict[str, CliBad] = {
    "scheduler-unreachable": CliBad(
        "--scheduler tcp://127.0.0.1:<a free port> (nothing listens)",
        cli_scheduler_unreachable,
        r"cannot reach the Dask scheduler at 'tcp://127\.0\.0\.1:\d+' .*run without --scheduler",
        "9",
    ),
    "scheduler-garbage": CliBad(
        "--scheduler 'garbage::x'",
        _scheduler("garbage::x"),
        r"scheduler address 'tcp://garbage::x' is malformed .*use tcp://host:port",
        "9",
    ),
    "scheduler-unknown-protocol": CliBad(
        "--scheduler http://127.0.0.1:8786 (the dashboard's protocol)",
        _scheduler("http://127.0.0.1:8786"),
        r"scheduler address 'http://127\.0\.0\.1:8786' has an unknown protocol; "
        r"use tcp://host:port",
        "9",
    ),
    "out-under-regular-file": CliBad(
        "--out under a regular file",
        cli_out_under_file,
        r"output folder '.*notes\.txt/out' is under '.*notes\.txt', which is a file; "
        r"choose a folder",
        "9",
    ),
    "out-under-proc": CliBad(
        "--out /proc/hyperdeq-out",
        lambda tmp, crop: Cli(_run(crop, Path("/proc/hyperdeq-out"))),
        r"output folder '/proc/hyperdeq-out' is on a system file system; choose a folder on a disk",
        "9",
    ),
    "out-read-only": CliBad(
        "--out on a read-only folder (a read-only mount when run as root)",
        cli_out_read_only,
        r"output folder '.*ro/out' is not writable \('.*ro' refuses writes\)",
        "9",
    ),
    "recipe-wrong-type": CliBad(
        '--recipe whose cluster mapping says n_workers: "two"',
        cli_recipe_wrong_type,
        r"cluster recipe '.*recipe\.yaml': n_workers must be a positive integer, got 'two'; "
        r"e\.g\. n_workers: 2",
        "9",
    ),
    "sweep-list-missing-scene": CliBad(
        "`hyperdeq sweep --list-file` whose 2nd line names a missing scene",
        cli_sweep_missing_scene,
        r"scenes\.txt' line 2: scene 'missing_scene\.tif' does not exist; fix or remove "
        r"the line",
        "9",
    ),
    "device-cuda-without-gpu": CliBad(
        "--device cuda on a host without a GPU (CUDA_VISIBLE_DEVICES='')",
        cli_device_cuda,
        r"--device 'cuda' was asked for but this host has 0 CUDA device\(s\); use "
        r"--device cpu",
        "9",
    ),
    "endmembers-500": CliBad(
        "--endmembers 500 for the 40-band crop (denoising on)",
        cli_endmembers_500,
        r"--endmembers 500 is not below the scene's 40 good bands .*lower --endmembers",
        "10",
    ),
    "one-row-scene": CliBad(
        "a 1x64 px crop of the real scene",
        _small((1, 64)),
        r"too small to tile: 1 row\(s\) x 64 column\(s\) .*at least 2 x 2 pixels",
        "11",
    ),
    "one-pixel-scene": CliBad(
        "a 1x1 px crop of the real scene",
        _small((1, 1)),
        r"too small to tile: 1 pixel .*at least 2 x 2 pixels",
        "11",
    ),
}


@pytest.mark.parametrize("name", sorted(CLI_CATALOGUE))
def test_cli_refuses_before_any_work(name: str, case: Any, demo_crop: Path, tmp_path: Path) -> None:
    from tests.reliability._helpers import refuse_cli

    bad = CLI_CATALOGUE[name]
    case(
        "bad input",
        f"`hyperdeq` {name} (issue 21 item {bad.item}): {bad.what}",
        f"exit 2 with one 'error:' line matching /{bad.match}/; no traceback; refused before any Dask cluster "
        "starts (no 'tile batches run on' line) and before any run.json is written",
    )
    cli = bad.make(tmp_path, demo_crop)
    measured, problems = refuse_cli(
        cli.args, tmp_path, bad.match, prefix=cli.prefix, env_extra=cli.env
    )
    case.measure(**measured)
    assert not problems, "\n".join(problems)
