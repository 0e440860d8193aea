"""Tile grid geometry: property tests (hypothesis) and error messages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.blend import blend_window, chunk_windows
from pipeline.errors import GridError
from pipeline.grid import Window, plan_grid, tile_weight


@st.composite
def geometries(draw: st.DrawFn) -> tuple[tuple[int, int], int, int]:
    tile = draw(st.integers(1, 24))
    halo = draw(st.integers(0, tile - 1))
    shape = (draw(st.integers(1, 70)), draw(st.integers(1, 70)))
    return shape, tile, halo


@settings(max_examples=100, deadline=None)
@given(geometries())
def test_cores_partition_scene_and_reads_stay_in_bounds(
    geom: tuple[tuple[int, int], int, int],
) -> None:
    shape, tile, halo = geom
    grid = plan_grid(shape, tile, halo)
    count = np.zeros(shape, dtype=int)
    for t in grid.tiles:
        count[t.core.slices] += 1
        r = t.read
        assert 0 <= r.y0 <= t.core.y0 < t.core.y1 <= r.y1 <= shape[0]
        assert 0 <= r.x0 <= t.core.x0 < t.core.x1 <= r.x1 <= shape[1]
        # the halo is exactly `halo` wide unless clipped by the scene edge
        assert t.core.y0 - r.y0 == min(halo, t.core.y0)
        assert r.y1 - t.core.y1 == min(halo, shape[0] - t.core.y1)
        assert t.core_in_read.shape == t.core.shape
        assert (r.y0 + t.core_in_read.y0, r.x0 + t.core_in_read.x0) == (t.core.y0, t.core.x0)
        assert t.read.height <= grid.max_read_shape[0] and t.read.width <= grid.max_read_shape[1]
    assert (count == 1).all(), "every pixel belongs to exactly one core"
    assert len({t.key for t in grid.tiles}) == len(grid.tiles)
    assert len(grid.tiles) == grid.n_rows * grid.n_cols


@settings(max_examples=40, deadline=None)
@given(
    geometries(),
    st.sampled_from(["hann", "uniform", "crop"]),
    st.integers(1, 40),
    st.integers(0, 2**31 - 1),
)
def test_identity_then_blend_returns_input_exactly(
    geom: tuple[tuple[int, int], int, int], window: str, chunk: int, seed: int
) -> None:
    shape, tile, halo = geom
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal((3, *shape)) * 10 ** rng.uniform(-3, 3)).astype(np.float32)
    holes = rng.random(shape) < 0.2
    data[:, holes] = np.nan
    grid = plan_grid(shape, tile, halo)
    out = np.empty_like(data)
    for w in chunk_windows(shape, chunk):  # one output chunk at a time, as the blend tasks do
        out[(slice(None), *w.slices)] = blend_window(
            lambda t: data[(slice(None), *t.read.slices)], grid, w, window, valid=~holes[w.slices]
        )
    np.testing.assert_array_equal(out, data)  # bit-exact, NaN where nodata


@settings(max_examples=40, deadline=None)
@given(geometries())
def test_hann_weights_positive_on_read_and_sum_to_one_away_from_small_edge_tiles(
    geom: tuple[tuple[int, int], int, int],
) -> None:
    shape, tile, halo = geom
    grid = plan_grid(shape, tile, halo)
    total = np.zeros(shape)
    for t in grid.tiles:
        w = tile_weight(t, "hann")
        assert (w > 0).all() and (w <= 1).all()
        total[t.read.slices] += w
    if tile >= 2 * halo and shape[0] % tile in (0,) and shape[1] % tile in (0,):
        # full tiles with non-overlapping ramps: the raised-cosine ramps form a partition of unity
        np.testing.assert_allclose(total, 1.0, atol=1e-12)


def test_crop_weight_is_the_core() -> None:
    grid = plan_grid((50, 40), 16, 5)
    t = grid.tiles[4]
    w = tile_weight(t, "crop")
    assert w.sum() == t.core.height * t.core.width
    assert (w[t.core_in_read.slices] == 1).all()


def test_all_nodata_tiles_are_skipped_and_recorded() -> None:
    valid = np.zeros((40, 40), dtype=bool)
    valid[:20, :20] = True
    valid[35, 39] = True
    grid = plan_grid((40, 40), 16, 4, valid)
    assert {t.key for t in grid.tiles} == {
        "r00000_c00000",
        "r00000_c00001",
        "r00001_c00000",
        "r00001_c00001",
        "r00002_c00002",
    }
    assert len(grid.skipped) == 4
    assert grid.to_dict()["skipped"] == [t.key for t in grid.skipped]
    assert len(grid.all_tiles) == 9


def test_tile_is_a_hashable_frozen_value() -> None:
    a = plan_grid((30, 30), 10, 2).tiles[4]
    b = plan_grid((30, 30), 10, 2).tiles[4]
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(AttributeError):
        a.halo = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("shape", "tile", "halo", "match"),
    [
        ((10, 10), 8, 8, r"halo 8 must be smaller than the tile 8"),
        ((10, 10), 8, 9, r"halo 9 must be smaller"),
        ((10, 10), 0, 0, r"tile size must be > 0, got 0"),
        ((10, 10), 8, -1, r"halo must be >= 0, got -1"),
        ((0, 10), 8, 1, r"scene shape must be positive, got \(0, 10\)"),
        ((10,), 8, 1, r"needs a 2-D \(y, x\) shape"),
    ],
)
def test_impossible_geometry_is_rejected(
    shape: tuple[int, ...], tile: int, halo: int, match: str
) -> None:
    with pytest.raises(GridError, match=match):
        plan_grid(shape, tile, halo)  # type: ignore[arg-type]


def test_mask_shape_mismatch_is_rejected() -> None:
    with pytest.raises(
        GridError, match=r"validity mask shape \(5, 5\) does not match the scene shape \(10, 10\)"
    ):
        plan_grid((10, 10), 4, 1, np.ones((5, 5), bool))


def test_window_negative_size_rejected() -> None:
    with pytest.raises(GridError, match="negative size"):
        Window(5, 4, 0, 1)


def test_per_tile_validity_matches_the_full_mask() -> None:
    import dask.array as dsa

    from pipeline.tiles import tile_validity

    rng = np.random.default_rng(3)
    valid = rng.random((45, 37)) < 0.02
    full = plan_grid((45, 37), 8, 2, valid)
    for mask in (valid, dsa.from_array(valid, chunks=(20, 20))):
        tv = tile_validity(mask, 8)
        assert tv.shape == (6, 5)
        assert plan_grid((45, 37), 8, 2, tile_valid=tv) == full
    with pytest.raises(GridError, match=r"per-tile validity has shape \(2, 2\), expected \(6, 5\)"):
        plan_grid((45, 37), 8, 2, tile_valid=np.ones((2, 2), bool))
