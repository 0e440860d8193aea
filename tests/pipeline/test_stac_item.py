"""The STAC Item of a run on real outputs (issue 23, item 14): acquisition datetime, spectral
bands with eo fields, raster fields, quicklook roles, and validation with the shipped schemas
and no network."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline import provenance as prov
from pipeline.errors import ProvenanceError
from pipeline.writers import create_output_zarr, geo_attrs, spectral_band_metadata, write_cog
from tests.pipeline.test_tiles import real_crop


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, xr.DataArray, dict]:
    """A run directory with real outputs of the EnMAP crop (denoised zarr + COG, abundances zarr, a PNG)."""
    crop = real_crop()
    d = tmp_path_factory.mktemp("run")
    coords = {k: crop[k].values for k in ("band", "wavelength", "fwhm", "good_band")}
    arrays = create_output_zarr(
        d / "denoised.zarr", "denoised", crop, channel_dim="band", chunk=16, channel_coords=coords
    )
    zarr.open_array(arrays["denoised"], mode="r+")[...] = crop.values
    write_cog(
        arrays["denoised"], d / "denoised.tif", crop, block=16, **spectral_band_metadata(crop)
    )
    create_output_zarr(
        d / "abundances.zarr",
        "abundances",
        crop,
        channel_dim="endmember",
        chunk=16,
        channel_coords={"endmember": np.array(["vegetation", "soil", "water"], dtype=object)},
        extra=[("rmse", None, None)],
    )
    (d / "quicklook_rgb.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    record = {
        "run_id": "0123456789abcdef",
        "status": prov.COMPLETE,
        "start": "2026-12-02T10:00:00Z",
        "end": "2026-12-02T10:05:00Z",
        "input": {"path": "/data/enmap.tif", "sha256": "x"},
        "config_hash": "c",
        "models": [{"name": "decsc"}, {"name": "deq-unmix"}],
        "code_version": "v0.1",
        "host": {"hostname": "node1"},
        "outputs": {
            "denoised_zarr": "denoised.zarr",
            "denoised_tif": "denoised.tif",
            "abundances_zarr": "abundances.zarr",
            "quicklook_rgb": "quicklook_rgb.png",
        },
    }
    return d, crop, record


def _bbox() -> tuple[list[float], dict]:
    b = [13.0, 52.3, 13.1, 52.4]
    return b, {
        "type": "Polygon",
        "coordinates": [[[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]], [b[0], b[1]]]],
    }


def test_item_describes_the_acquisition_and_the_bands(run: tuple, no_network: None) -> None:
    d, crop, record = run
    bbox, geom = _bbox()
    item = prov.stac_item(record, geo_attrs(crop), bbox, geom, scene=crop, run_dir=d)
    p = prov.write_stac_item(d, item)
    item = json.loads(p.read_text())
    prov.validate_stac_item(item)  # core schema from pystac, extensions shipped: no network

    props = item["properties"]
    assert props["datetime"] == "2022-07-24T10:45:26Z"  # EnMAP start_time, not the processing time
    assert props["hyperdeq:datetime_source"] == "acquisition"
    assert props["processing:datetime"] == "2026-12-02T10:05:00Z" == props["created"]
    assert props["proj:wkt2"].startswith("PROJCRS[") and props["proj:code"] == "EPSG:32633"
    assert set(item["stac_extensions"]) == {
        prov.PROCESSING_EXT,
        prov.PROJECTION_EXT,
        prov.EO_EXT,
        prov.RASTER_EXT,
    }

    tif = item["assets"]["denoised_tif"]
    assert tif["roles"] == ["data"] and "cloud-optimized" in tif["type"]
    bands = tif["bands"]
    assert len(bands) == 224
    wl, fw, good = (crop[k].values for k in ("wavelength", "fwhm", "good_band"))
    np.testing.assert_allclose([b["eo:center_wavelength"] for b in bands], wl / 1000, atol=1e-6)
    np.testing.assert_allclose([b["eo:full_width_half_max"] for b in bands], fw / 1000, atol=1e-6)
    assert [b["hyperdeq:good_band"] for b in bands] == [bool(g) for g in good]
    assert all(b["nodata"] == "nan" and b["data_type"] == "float32" for b in bands)
    assert tif["raster:spatial_resolution"] == pytest.approx(abs(crop.rio.transform().a))
    assert tif["hyperdeq:source_scale_factor"] == 10000.0
    assert len(item["assets"]["denoised_zarr"]["bands"]) == 224
    assert [b["name"] for b in item["assets"]["abundances_zarr"]["bands"]] == [
        "vegetation",
        "soil",
        "water",
    ]
    assert item["assets"]["quicklook_rgb"]["roles"] == ["overview"]
    assert item["assets"]["run_record"]["roles"] == ["metadata"]


def test_without_an_acquisition_time_the_item_says_it_uses_the_processing_time(
    run: tuple, no_network: None
) -> None:
    d, crop, record = run
    bare = crop.copy()
    bare.attrs = {k: v for k, v in crop.attrs.items() if k != "start_time"}
    item = prov.stac_item(record, geo_attrs(bare), *_bbox(), scene=bare)
    prov.validate_stac_item(item)
    assert item["properties"]["datetime"] == "2026-12-02T10:05:00Z"
    assert item["properties"]["hyperdeq:datetime_source"].startswith("processing")


def test_the_shipped_schemas_reject_wrong_fields(run: tuple, no_network: None) -> None:
    d, crop, record = run
    item = prov.stac_item(record, geo_attrs(crop), *_bbox(), scene=crop, run_dir=d)
    bad = json.loads(json.dumps(item))
    bad["assets"]["denoised_tif"]["bands"][0]["eo:center_wavelength"] = "418 nm"
    with pytest.raises(ProvenanceError, match=r"is not valid"):
        prov.validate_stac_item(bad)
    bad = json.loads(json.dumps(item))
    bad["properties"]["proj:shape"] = [48]
    with pytest.raises(ProvenanceError, match=r"is not valid"):
        prov.validate_stac_item(bad)
    bad = json.loads(json.dumps(item))
    bad["stac_extensions"].append("https://stac-extensions.github.io/sat/v1.0.0/schema.json")
    with pytest.raises(ProvenanceError, match=r"not shipped in pipeline/stac_schemas"):
        prov.validate_stac_item(bad)
    bad = json.loads(json.dumps(item))
    bad["stac_extensions"].remove(
        prov.EO_EXT
    )  # eo fields without declaring the extension: core still passes,
    bad["assets"]["denoised_tif"]["raster:sampling"] = "centre"  # but a wrong raster value does not
    with pytest.raises(ProvenanceError, match=r"is not valid"):
        prov.validate_stac_item(bad)


def test_schemas_are_package_data() -> None:
    schemas = prov.stac_schemas()
    assert set(schemas) == set(prov.STAC_SCHEMA_FILES)
    for uri, s in schemas.items():
        assert s["$id"] == uri
