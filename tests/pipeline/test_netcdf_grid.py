"""NetCDF cubes on a grid that an affine transform cannot describe are refused; regular ones read.

The cube is the real EnMAP Potsdam tile (tests/data) written as CF NetCDF with rioxarray.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rioxarray
import xarray as xr

from pipeline.errors import InputValidationError
from pipeline.readers import open_scene
from tests.pipeline.test_readers import TILE


def _tile() -> xr.DataArray:
    da = rioxarray.open_rasterio(TILE).isel(band=slice(20, 40))
    da = (da.where(da != -32768) / 10000).astype("float32")
    da.attrs, da.encoding = {}, {}
    return da.rename("reflectance")


def test_unevenly_spaced_x_is_refused(tmp_path: Path) -> None:
    da = _tile()
    x = da.x.values.copy()
    x[10:] += 7.5  # one column step of 37.5 m among 30 m steps
    p = tmp_path / "uneven.nc"
    da.assign_coords(x=x).to_dataset().to_netcdf(p)
    with pytest.raises(
        InputValidationError,
        match=r"the 'x' coordinates of '.*uneven\.nc' are not evenly spaced "
        r"\(steps from 30\.0 to 37\.5\).*Resample the scene",
    ):
        open_scene(p)


def test_regular_grid_with_float32_lat_lon_reads(tmp_path: Path) -> None:
    """Rounding of float32 coordinates is not irregularity."""
    da = _tile()
    ny, nx = da.sizes["y"], da.sizes["x"]
    lat = (52.4 - 0.00027 * np.arange(ny)).astype("float32")
    lon = (13.05 + 0.00027 * np.arange(nx)).astype("float32")
    geo = xr.DataArray(
        da.values, dims=("band", "lat", "lon"), coords={"lat": lat, "lon": lon}, name="reflectance"
    )
    geo = geo.rio.set_spatial_dims(x_dim="lon", y_dim="lat").rio.write_crs("EPSG:4326")
    p = tmp_path / "latlon.nc"
    geo.to_dataset().to_netcdf(p)
    s = open_scene(p)
    assert s.rio.crs.to_epsg() == 4326 and s.rio.transform().a == pytest.approx(0.00027, rel=1e-3)
