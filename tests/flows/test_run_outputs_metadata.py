"""A real run's outputs carry the input's metadata (issue 23, items 12-14), end to end.

The real EnMAP crop goes through the pipeline (identity denoiser, so it takes seconds); its zarr,
COG and STAC Item are reopened: the COG carries ``spectral_band_metadata(like)`` and the STAC
Item the scene's acquisition time and bands, as the orchestration (``workers/stages.py``) writes them.
"""

from __future__ import annotations

import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import xarray as xr

from tests.pipeline.test_tiles import write_crop_tif

ACQUIRED = "2022-07-24T10:45:26Z"  # the EnMAP file's start_time


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from pipeline.config import RunConfig
    from workers.infer import IdentityTileModel
    from workers.run import Job, run_scene

    d = tmp_path_factory.mktemp("run")
    scene = write_crop_tif(d / "enmap crop.tif")
    job = Job(RunConfig(tile=32, halo=4, out_root=d / "out"), unmix=None)
    with ThreadPoolExecutor(2) as ex:
        res = run_scene(scene, job, cluster=ex, tile_models={"denoise": IdentityTileModel()})
    assert res.status == "complete"
    return res


def _good(res: Any) -> np.ndarray:
    from pipeline.writers import open_output

    return np.asarray(
        open_output(_out(res, "denoised_zarr"), "denoised")["good_band"].values, dtype=bool
    )


def _out(res: Any, key: str) -> Path:
    v = res.outputs[key]
    return Path(res.run_dir) / v["path"] if isinstance(v, dict) else Path(v)


def test_run_zarr_output_has_cf_metadata_and_opens_without_warnings(run: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(_out(run, "denoised_zarr"))
    assert ds.attrs["acquisition_time"] == ACQUIRED and ds.attrs["source_scale_factor"] == 10000.0
    assert ds.attrs["proj:wkt2"].startswith("PROJCRS[") and ds.attrs["hyperdeq_complete"] is True
    assert (
        ds.attrs["hyperdeq_run"]["run_id"] == run.run_id
    )  # written after creation, still consolidated
    assert ds["x"].attrs["units"] == "m" and ds["wavelength"].attrs["units"] == "nm"
    assert ds.rio.crs.to_epsg() == 32633
    assert len(ds.attrs["bad_bands"]) == int((~_good(run)).sum()) == 6


def test_run_cog_has_scene_tags(run: Any) -> None:
    with rasterio.open(_out(run, "denoised_tif")) as f:
        tags = f.tags()
        assert (
            tags["acquisition_time"] == ACQUIRED and float(tags["source_scale_factor"]) == 10000.0
        )
        assert json.loads(tags["bad_bands"]) == [int(i) for i in np.flatnonzero(~_good(run))]
        assert f.units[0] == "1"


def test_run_cog_flags_bad_bands_with_units(run: Any) -> None:
    good = _good(run)
    bad = int(np.flatnonzero(~good)[0])
    with rasterio.open(_out(run, "denoised_tif")) as f:
        t = f.tags(bad + 1)
        assert t["wavelength_units"] == "nm" and t["bbl"] == "0"
        assert f.descriptions[bad].endswith("(bad band)")


def test_run_stac_item_is_dated_by_the_acquisition_and_lists_bands(run: Any) -> None:
    from pipeline import provenance as prov

    item = json.loads((Path(run.run_dir) / prov.STAC_JSON).read_text())
    prov.validate_stac_item(item)
    assert item["properties"]["datetime"] == ACQUIRED
    assert len(item["assets"]["denoised_tif"]["bands"]) == 224
    assert item["assets"]["quicklook_rgb"]["roles"] == ["overview"]
