"""A hyperdeq zarr store that lost or damaged a chunk (an incomplete copy) is refused, never read as nodata.

The store is an ingest of a real EnMAP crop (tests/data), chunked 16 px so that it has 4 chunks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipeline.errors import ReadError
from pipeline.ingest import ingest_scene, open_zarr_scene
from pipeline.readers import open_scene
from tests.pipeline.test_tiles import write_crop_tif


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("store")
    src = write_crop_tif(tmp / "crop.tif", 96, 64, 32, 32)  # fully valid block of the demo mosaic
    return ingest_scene(src, tmp / "scene.zarr", chunk=16)


def _copy(store: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy.zarr"
    shutil.copytree(store, dest)
    return dest


def test_missing_data_chunk_is_refused(store: Path, tmp_path: Path) -> None:
    p = _copy(store, tmp_path)
    (p / "reflectance" / "c" / "0" / "1" / "1").unlink()
    msg = r"is damaged: 1 of 4 data chunks are missing, e.g. the chunk of rows 16:32, cols 16:32 that held 256 valid"
    with pytest.raises(ReadError, match=msg + r".*Copy the store again or ingest the source again"):
        open_zarr_scene(p)
    with pytest.raises(ReadError, match=msg):
        open_scene(p)
    with pytest.raises(ReadError, match=msg):
        ingest_scene(p, tmp_path / "again.zarr")


def test_missing_data_array_is_refused(store: Path, tmp_path: Path) -> None:
    p = _copy(store, tmp_path)
    shutil.rmtree(p / "reflectance")
    with pytest.raises(ReadError, match=r"is damaged: its 'reflectance' array is missing"):
        open_zarr_scene(p)


def test_corrupt_chunk_is_a_read_error_naming_the_window(store: Path, tmp_path: Path) -> None:
    p = _copy(store, tmp_path)
    chunk = p / "reflectance" / "c" / "0" / "0" / "1"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(
        ReadError, match=r"cannot read rows 0:32, cols 0:32 of zarr store .*a chunk is corrupt"
    ):
        ingest_scene(p, tmp_path / "again.zarr")


def test_all_nodata_region_without_a_chunk_is_fine(tmp_path: Path) -> None:
    """zarr does not write all-NaN chunks: a nodata hole has no chunk, and that is not damage."""
    src = write_crop_tif(tmp_path / "crop.tif", 96, 64, 32, 32)
    with rasterio.open(src, "r+") as f:
        cube = f.read()
        cube[:, :16, :16] = f.nodata
        f.write(cube)
    p = ingest_scene(src, tmp_path / "holes.zarr", chunk=16)
    assert not (p / "reflectance" / "c" / "0" / "0" / "0").exists()
    scene = open_zarr_scene(p)
    v = scene.values[scene["good_band"].values]  # bad bands are nodata everywhere in EnMAP L2A
    assert np.isnan(v[:, :16, :16]).all() and np.isfinite(v[:, 16:, :]).all()


def test_corrupt_chunk_read_lazily_is_a_read_error_naming_store_and_chunk(
    store: Path, tmp_path: Path
) -> None:
    """open_zarr_scene is lazy: the chunk is decoded on .values / .compute(), outside the reader."""
    p = _copy(store, tmp_path)
    chunk = p / "reflectance" / "c" / "0" / "0" / "1"
    chunk.write_bytes(chunk.read_bytes()[:100])
    scene = open_zarr_scene(p)  # metadata only: opening still works
    # the truncated chunk fails its crc32c checksum before it reaches the decompressor
    chunk = (
        r"\(the chunk of rows 0:16, cols 16:32\) of zarr store '.*copy\.zarr': chunk "
        r"reflectance/c/0/0/1 fails its crc32c checksum"
    )
    advice = r".*the chunk is corrupt .*Copy the store again or ingest the source again"
    with pytest.raises(ReadError, match=r"cannot read rows 0:16, cols 16:32 " + chunk + advice):
        _ = scene.values
    with pytest.raises(ReadError, match=r"cannot read rows 2:5, cols 20:30 " + chunk + advice):
        scene.isel(y=slice(2, 5), x=slice(20, 30)).compute()
    # the undamaged chunks still read, and exactly as before
    good = open_zarr_scene(store).isel(x=slice(0, 16)).values
    np.testing.assert_array_equal(scene.isel(x=slice(0, 16)).values, good)


def test_bit_flip_in_an_output_store_is_named_when_exported(store: Path, tmp_path: Path) -> None:
    """Output stores carry crc32c per chunk: a flipped byte fails the COG export with the chunk named."""
    from pipeline.chunk_checksums import ChunkChecksumError
    from pipeline.writers import create_output_zarr, write_cog

    like = open_zarr_scene(store)
    out = tmp_path / "denoised.zarr"
    arrays = create_output_zarr(
        out,
        "denoised",
        like,
        channel_dim="band",
        chunk=16,
        channel_coords={k: like[k].values for k in ("band", "wavelength", "fwhm", "good_band")},
    )
    import zarr

    z = zarr.open_array(str(out / "denoised"), mode="r+")
    z[:] = np.nan_to_num(like.values)
    write_cog(out / "denoised", tmp_path / "ok.tif", like)  # intact: exports
    chunk = next(p for p in (out / "denoised").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(
        ChunkChecksumError, match=r"chunk 'c/.*of array 'denoised'.*crc32c checksum"
    ):
        write_cog(out / "denoised", tmp_path / "bad.tif", like)
    assert arrays["denoised"]
