"""DEQ-Unmix: simplex projection, known-truth recovery, fit/apply/save/load, NaN handling, memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError, InputValidationError, ModelError
from pipeline.metrics import abundance_rmse, match_endmembers, sad_degrees
from pipeline.scene import build_scene
from workers.unmix.classical import fcls, vca
from workers.unmix.deq_unmix import DEQUnmix, simplex_project
from workers.unmix.fit import UnmixFit, apply_fit, fit_scene, write_endmembers

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def crops(test_data):
    return dict(np.load(test_data / "unmix" / "unmix_crops.npz"))


@pytest.fixture(scope="module")
def synthetic(crops):
    """24×24 mixture of 3 real USGS spectra, Dirichlet abundances, 30 dB, with pure pixels."""
    E = crops["usgs_spectra"][:, [0, 2, 4]].astype(np.float64)
    rng = np.random.default_rng(0)
    A = rng.dirichlet(np.ones(3), size=24 * 24).T
    A[:, [0, 100, 300]] = np.eye(3)
    Y = E @ A
    Y = Y + np.sqrt(np.mean(Y**2) / 1e3) * rng.standard_normal(Y.shape)
    cube = Y.reshape(-1, 24, 24).astype(np.float32)
    return cube, E, A


@pytest.fixture(scope="module")
def fitted(synthetic, crops):
    cube, E, _ = synthetic
    scene = build_scene(cube, wavelength=crops["usgs_wavelength_nm"], source="synthetic-usgs")
    return fit_scene(
        scene, 3, seed=0, sample_pixels=400, fit_tiles=2, fit_tile_size=24, max_epochs=4
    )


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=2, max_size=8))
def test_simplex_projection_lands_on_simplex(v):
    x = torch.tensor(v, dtype=torch.float64)[None, :, None]
    p = simplex_project(x, dim=1)[0, :, 0]
    assert torch.all(p >= 0)
    assert abs(float(p.sum()) - 1.0) < 1e-9
    # it is the closest simplex point: no vertex is closer
    for k in range(len(v)):
        e = torch.zeros(len(v), dtype=torch.float64)
        e[k] = 1
        assert float((x[0, :, 0] - p).norm()) <= float((x[0, :, 0] - e).norm()) + 1e-9


def test_untrained_deq_fixed_point_is_fcls(synthetic):
    """With the correction net at its zero start the map is projected gradient: FCLS."""
    cube, E, _ = synthetic
    L = cube.shape[0]
    m = DEQUnmix(torch.from_numpy(E.astype(np.float32)), tol=1e-6, eval_max_iter=300).eval()
    with torch.no_grad():
        A, stats = m(torch.from_numpy(cube[None]))
    ref = fcls(cube.reshape(L, -1).astype(np.float64), E)
    np.testing.assert_allclose(A[0].reshape(3, -1).numpy(), ref, atol=2e-3)
    assert float(stats.converged.float().mean()) > 0.95


def test_known_truth_recovery_and_simplex(fitted, synthetic):
    cube, E, A_true = synthetic
    A, rmse_map, stats = apply_fit(fitted, cube)
    assert A.shape == (3, 24, 24) and rmse_map.shape == (24, 24)
    assert np.all(A >= 0)
    np.testing.assert_allclose(A.sum(axis=0), 1.0, atol=1e-5)
    perm = match_endmembers(E, fitted.endmembers.astype(np.float64))
    assert np.mean(sad_degrees(E, fitted.endmembers[:, perm].astype(np.float64))) < 2.0
    assert abundance_rmse(A_true, A.reshape(3, -1)[perm])[0] < 0.05
    assert set(stats) == {"iterations", "residual", "converged", "converged_pixels", "valid_pixels"}
    assert stats["valid_pixels"] == 24 * 24 and 0 <= stats["converged_pixels"] <= 24 * 24
    assert stats["converged"] == (stats["converged_pixels"] == stats["valid_pixels"])
    assert len(fitted.provenance["loss_curve"]) == 4
    assert fitted.provenance["sample"]["sample_pixels"] == 400


def test_hungarian_matching_undoes_a_permutation(synthetic):
    _, E, A = synthetic
    perm_true = np.array([2, 0, 1])
    perm = match_endmembers(E, E[:, perm_true])
    np.testing.assert_array_equal(E[:, perm_true][:, perm], E)
    np.testing.assert_array_equal(A[perm_true][perm], A)


def test_save_load_round_trip(fitted, synthetic, tmp_path):
    cube, _, _ = synthetic
    fitted.save(tmp_path / "fit")
    assert not list((tmp_path / "fit").glob("*.pt")) and not list((tmp_path / "fit").glob("*.pkl"))
    back = UnmixFit.load(tmp_path / "fit")
    np.testing.assert_array_equal(back.endmembers, fitted.endmembers)
    np.testing.assert_array_equal(back.good_band, fitted.good_band)
    np.testing.assert_array_equal(back.wavelengths, fitted.wavelengths)
    assert (
        back.names == fitted.names
        and back.provenance["loss_curve"] == fitted.provenance["loss_curve"]
    )
    a1, r1, s1 = apply_fit(fitted, cube)
    a2, r2, s2 = apply_fit(back, cube)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(r1, r2)
    assert s1 == s2
    write_endmembers(back, tmp_path / "em.csv", tmp_path / "em.json")
    rows = (tmp_path / "em.csv").read_text().splitlines()
    assert rows[0] == "wavelength_nm,em1,em2,em3" and len(rows) == 1 + cube.shape[0]
    with pytest.raises(ModelError, match="run fit_scene"):
        UnmixFit.load(tmp_path / "nothing")


def test_apply_fit_nan_handling(fitted, synthetic):
    cube, _, _ = synthetic
    c = cube.copy()
    c[:, 3, 5] = np.nan
    c[7, 10:14, 2] = np.nan  # one band missing still makes the pixel nodata
    A, rmse_map, _ = apply_fit(fitted, c)
    invalid = ~np.isfinite(c).all(axis=0)
    assert invalid.sum() == 5
    assert np.all(np.isnan(A[:, invalid])) and np.all(np.isnan(rmse_map[invalid]))
    valid = A[:, ~invalid]
    assert np.all(valid >= 0) and np.allclose(valid.sum(axis=0), 1.0, atol=1e-5)
    A_all, _, _ = apply_fit(fitted, np.full_like(c, np.nan))
    assert np.all(np.isnan(A_all))
    with pytest.raises(InputValidationError, match="good bands"):
        apply_fit(fitted, cube[:-1])


def test_fit_scene_nodata_and_bad_bands(crops):
    """Real Samson crop with a nodata hole and two bad bands; P estimated by HySime."""
    cube = crops["samson_cube"].copy()
    cube[:, :6, :6] = np.nan
    good = np.ones(cube.shape[0], bool)
    good[[0, 1]] = False
    cube[0] = np.nan  # a bad band full of NaN must not invalidate pixels
    scene = build_scene(cube, good_band=good, source="samson-crop")
    # the VCA start: the start rule is tested on its own; here P = 8 from HySime would make it
    # score every candidate of the default rule
    fit = fit_scene(
        scene,
        None,
        seed=1,
        sample_pixels=300,
        fit_tiles=2,
        fit_tile_size=16,
        max_epochs=1,
        options={"init": "vca"},
    )
    assert fit.endmembers.shape[0] == cube.shape[0] - 2
    assert fit.provenance["n_endmembers"]["method"] == "hysime"
    assert 2 <= fit.n_endmembers <= 8
    assert np.all(fit.endmembers >= 0)
    A, _, _ = apply_fit(fit, cube[good])
    assert np.all(np.isnan(A[:, :6, :6])) and np.isfinite(A[:, 10:, 10:]).all()
    with pytest.raises(ConfigError, match="n_endmembers must be"):
        fit_scene(scene, 1)


def test_fit_is_seeded(synthetic, crops):
    cube, _, _ = synthetic
    scene = build_scene(cube[:, :16, :16], source="s")
    kw = dict(sample_pixels=200, fit_tiles=1, fit_tile_size=16, max_epochs=2)
    f1, f2 = fit_scene(scene, 3, seed=3, **kw), fit_scene(scene, 3, seed=3, **kw)
    np.testing.assert_array_equal(f1.endmembers, f2.endmembers)
    assert f1.provenance["loss_curve"] == f2.provenance["loss_curve"]


def test_vca_start_on_real_samson_crop(crops):
    cube = crops["samson_cube"].astype(np.float64)
    E_est, _ = vca(cube.reshape(cube.shape[0], -1), 3, seed=0)
    perm = match_endmembers(crops["samson_endmembers"].astype(np.float64), E_est)
    assert np.mean(sad_degrees(crops["samson_endmembers"].astype(np.float64), E_est[:, perm])) < 15


def test_init_endmembers_picks_lowest_reconstruction_beyond_the_linear_model(crops):
    """Real data (a Samson crop) is not a linear mixture to its noise floor: the blind start is
    the pure-pixel candidate with the lowest FCLS reconstruction error on the sample."""
    from workers.unmix.fit import LMM_TOLERANCE, init_endmembers

    cube = crops["samson_cube"].astype(np.float64)
    Y = cube.reshape(cube.shape[0], -1)
    E0, rec = init_endmembers(Y, 3, seed=0)
    assert rec["minvol_rmse_over_floor"] > LMM_TOLERANCE
    cands = rec["candidates_rmse"]
    # default: class means of both extractions only (the raw extractions would always win on
    # reconstruction error: they are the most extreme simplex)
    assert set(cands) == {"vca-class0.25", "nfindr-class0.25"}
    assert rec["method"] == min(cands, key=cands.get)
    assert E0.shape == (Y.shape[0], 3) and np.all(E0 >= 0)
    A = fcls(Y, E0)
    assert np.sqrt(np.mean((Y - E0 @ A) ** 2)) == pytest.approx(cands[rec["method"]], rel=1e-6)
    ct = rec["pure_pixel_candidates_rmse"]
    assert {"vca", "nfindr"} <= set(ct) and any("-top" in k for k in ct)
    Ev, rv = init_endmembers(Y, 3, seed=0, method="vca")
    np.testing.assert_array_equal(Ev, np.clip(vca(Y, 3, seed=0)[0], 0, None))
    assert rv["method"] == "vca"
    with pytest.raises(ConfigError, match="init must be"):
        init_endmembers(Y, 3, seed=0, method="ppi")
    with pytest.raises(ConfigError, match="init_class_fraction"):
        init_endmembers(Y, 3, seed=0, class_fraction=0.0)


def test_init_endmembers_keeps_pure_pixels_of_a_linear_mixture(synthetic, crops):
    """A linear mixture that has pure pixels (24×24, 3 USGS spectra, 30 dB) is recognised at its
    noise floor whatever its size (576 pixels of 224 bands: 0.995× the floor; the regression
    noise estimate without its degrees-of-freedom correction made that 1.27× and sent it to the
    pure-pixel branch), and its start is within 1.5° of the truth. With illumination and
    endmember variability (smooth maps with near-pure regions, 25 dB) the minimum-volume simplex
    misses its gate and the best pure-pixel candidate, within 2× the floor, is the start (class
    means would shrink the simplex towards mixed pixels)."""
    from workers.unmix.evaluate import variability_mixture
    from workers.unmix.fit import LMM_TOLERANCE, PURE_TOLERANCE, init_endmembers

    cube, E, _ = synthetic
    Y = cube.reshape(cube.shape[0], -1).astype(np.float64)
    E0, rec = init_endmembers(Y, 3, seed=0)
    assert rec["method"] == "minvol" and 0.97 < rec["minvol_rmse_over_floor"] <= LMM_TOLERANCE
    assert np.mean(sad_degrees(E, E0[:, match_endmembers(E, E0)])) < 1.5

    Yv, _ = variability_mixture(E, np.random.default_rng(0), 48, 25.0)
    E0, rec = init_endmembers(Yv, 3, seed=0)
    assert rec["minvol_rmse_over_floor"] > LMM_TOLERANCE
    assert rec["pure_pixel_rmse_over_floor"] <= PURE_TOLERANCE
    assert "-class" not in rec["method"] and "class_pixels" in rec
    assert np.mean(sad_degrees(E, E0[:, match_endmembers(E, E0)])) < 2.0


def _purest_pixel_start(Y: np.ndarray, P: int) -> np.ndarray:
    """The pure-pixel candidate with the lowest FCLS reconstruction error: VCA or N-FINDR, or
    either with every endmember the mean of its k purest pixels (k in 10, 30, 100; k <= N/(4P))."""
    from workers.unmix.classical import nfindr

    cands = []
    for E in (np.clip(vca(Y, P, seed=0)[0], 0, None), np.clip(nfindr(Y, P, seed=0)[0], 0, None)):
        A = fcls(Y, E)
        cands.append(E)
        for k in (10, 30, 100):
            if k <= Y.shape[1] // (4 * P):
                top = np.argsort(-A, axis=1)[:, :k]
                cands.append(np.stack([Y[:, top[i]].mean(axis=1) for i in range(P)], axis=1))
    return min(cands, key=lambda E: float(np.mean((Y - E @ fcls(Y, E)) ** 2)))


def test_class_start_is_closer_to_the_reference_than_the_purest_pixels(crops):
    """Real Samson crop (32×32): the default start (means of the purest quarter of each
    endmember's class) is closer to the reference endmembers, which are averages over pure
    regions, than the best pure-pixel candidate (the raw extraction or the mean of its few purest
    pixels, whichever reconstructs the sample best)."""
    from workers.unmix.fit import init_endmembers

    cube = crops["samson_cube"].astype(np.float64)
    Y = cube.reshape(cube.shape[0], -1)
    R = crops["samson_endmembers"].astype(np.float64)
    E0, rec = init_endmembers(Y, 3, seed=0)
    assert "-class" in rec["method"]
    Et = _purest_pixel_start(Y, 3)
    sad_class = float(np.mean(sad_degrees(R, E0[:, match_endmembers(R, E0)])))
    sad_pure = float(np.mean(sad_degrees(R, Et[:, match_endmembers(R, Et)])))
    assert sad_class < 0.85 * sad_pure, (sad_class, sad_pure)


def test_class_pure_means_averages_the_core_of_each_class():
    """Two materials whose pure pixels vary in brightness and shape around a mean spectrum, one
    common (400 pixels), one rare (24): each endmember becomes the mean of the purest quarter of
    its class (at least 10 pixels), so the common material is averaged over 100 pixels and lands
    near its mean spectrum, far closer than the extreme pixel an extraction returns."""
    from workers.unmix.fit import class_pure_means

    rng = np.random.default_rng(0)
    L = 40
    m0 = 0.2 + 0.6 * np.linspace(0, 1, L)
    m1 = 0.8 - 0.5 * np.linspace(0, 1, L) ** 2
    common = m0[:, None] * rng.uniform(0.8, 1.2, 400) + 0.03 * rng.standard_normal((L, 400))
    rare = m1[:, None] * rng.uniform(0.8, 1.2, 24) + 0.03 * rng.standard_normal((L, 24))
    Ys = np.concatenate([common, rare], axis=1)
    # an "extraction": the single most extreme pixel of each material
    E = np.stack(
        [
            common[:, np.argmax(sad_degrees(np.repeat(m0[:, None], 400, 1), common))],
            rare[:, np.argmax(sad_degrees(np.repeat(m1[:, None], 24, 1), rare))],
        ],
        axis=1,
    )
    A = fcls(Ys, E)
    Ec, counts = class_pure_means(Ys, E, A, 0.25)
    lab = np.argmax(A, axis=0)
    sizes = np.bincount(lab, minlength=2)
    assert counts == [max(10, round(0.25 * sizes[0])), max(10, round(0.25 * sizes[1]))]
    assert counts[0] >= 90 and counts[1] == 10
    for j, m in enumerate((m0, m1)):
        idx = np.flatnonzero(lab == j)
        top = idx[np.argsort(-A[j, idx], kind="stable")[: counts[j]]]
        np.testing.assert_allclose(Ec[:, j], Ys[:, top].mean(axis=1))
        assert sad_degrees(m[:, None], Ec[:, [j]])[0] < 0.5 * sad_degrees(m[:, None], E[:, [j]])[0]
    # a class smaller than min_pixels: the min_pixels largest abundances over the whole sample
    Ec2, counts2 = class_pure_means(Ys, E, A, 0.25, min_pixels=50)
    assert counts2[1] == 50
    np.testing.assert_allclose(Ec2[:, 1], Ys[:, np.argsort(-A[1])[:50]].mean(axis=1))


def test_init_endmembers_takes_min_volume_for_a_linear_mixture_without_pure_pixels(crops):
    """A linear mixture without pure pixels (4 real USGS spectra, Dirichlet abundances clipped
    away from the vertices, 30 dB): the minimum-volume simplex reaches the noise floor and is
    the start; it is closer to the truth than VCA, whose vertices are mixed pixels."""
    from workers.unmix.fit import LMM_TOLERANCE, init_endmembers

    E = crops["usgs_spectra"][:, [0, 1, 2, 4]].astype(np.float64)
    rng = np.random.default_rng(3)
    A = rng.dirichlet(np.ones(4), size=3000).T
    A = A[:, A.max(axis=0) < 0.8]  # no pixel above 80 % of one endmember
    Y = E @ A
    Y = Y + np.sqrt(np.mean(Y**2) / 1e3) * rng.standard_normal(Y.shape)
    E0, rec = init_endmembers(Y, 4, seed=0)
    assert rec["method"] == "minvol" and rec["minvol_rmse_over_floor"] <= LMM_TOLERANCE
    sad = sad_degrees(E, E0[:, match_endmembers(E, E0)])
    Ev = vca(Y, 4, seed=0)[0]
    sad_vca = sad_degrees(E, Ev[:, match_endmembers(E, Ev)])
    assert np.mean(sad) < 0.5 * np.mean(sad_vca)
    assert np.mean(sad) < 2.0


def test_fit_keeps_best_validated_state(fitted):
    """Early stopping: the returned state is the best of the validation curve (start included)."""
    val = fitted.provenance["val_curve"]
    assert val[0][0] == 0 and len(val) >= 2
    best = min(val, key=lambda ev: ev[1])
    assert fitted.provenance["best_epoch"] == best[0]
    if best[0] == 0:  # nothing improved: the fit is its start, with the zero correction net
        start = fitted.provenance["endmembers"]["start"]
        np.testing.assert_array_equal(
            fitted.endmembers, np.asarray([start[n] for n in fitted.names], dtype=np.float32).T
        )


def test_cli_and_fit_default_epochs_agree():
    import inspect

    from flows.cli_unmix import DEFAULT_EPOCHS as cli_default
    from workers.unmix.fit import DEFAULT_EPOCHS

    assert cli_default == DEFAULT_EPOCHS
    assert inspect.signature(fit_scene).parameters["max_epochs"].default == DEFAULT_EPOCHS


# ------------------------------------------------------------------ a fit that learns (real scenes)


@pytest.fixture(scope="module")
def pavia(test_data):
    """Pavia University crop, 50×50×103: smaller than the default 64-pixel fit tile."""
    from pipeline.readers import open_scene

    return open_scene(test_data / "pavia_u_sub" / "paviaU_subimg.mat")


@pytest.fixture(scope="module")
def pavia_fit(pavia):
    """The blind fit of the Pavia crop (P from HySime, 60 epochs, early stopping) with the linear
    mixing model: the training loop's tests (the default ``auto`` picks the scaled model here,
    whose fit keeps its start and says why: ``pavia_start_fit``)."""
    return fit_scene(pavia, None, seed=0, options={"mixing": "linear"})


def test_scene_smaller_than_the_fit_tile_is_fitted_once_whole(pavia_fit):
    """A 50×50 scene and 64-pixel fit tiles: one fit tile, the whole scene (not the same crop
    drawn fit_tiles times per step)."""
    tiles = pavia_fit.provenance["fit_tiles"]
    assert tiles["count"] == 1 and tiles["requested"] == 8
    assert tiles["origins_yx"] == [[0, 0]] and tiles["size"] == [50, 50]


def test_fit_tiles_are_distinct_windows_scaled_to_the_scene(crops):
    """Real Samson crop (32×32), 12-pixel fit tiles: the candidates are the 3×3 windows that cover
    the scene; 8 requested gives 8 distinct ones, 20 requested gives the 9 the scene holds; a
    nodata hole takes out the windows that are less than half valid."""
    from workers.unmix.fit import window_starts

    assert (
        window_starts(32, 12) == [0, 10, 20]
        and window_starts(50, 64) == [0]
        and window_starts(24, 12) == [0, 12]
    )
    scene = build_scene(crops["samson_cube"], source="samson-crop")
    kw = dict(sample_pixels=300, fit_tile_size=12, max_epochs=0, options={"init": "vca"})
    t8 = fit_scene(scene, 3, seed=0, fit_tiles=8, **kw).provenance["fit_tiles"]
    origins = [tuple(o) for o in t8["origins_yx"]]
    assert t8["count"] == 8 and len(set(origins)) == 8 and t8["size"] == [12, 12]
    assert set(origins) <= {(y, x) for y in (0, 10, 20) for x in (0, 10, 20)}
    t20 = fit_scene(scene, 3, seed=0, fit_tiles=20, **kw).provenance["fit_tiles"]
    assert t20["count"] == 9 and t20["grid"] == [3, 3]
    covered = np.zeros((32, 32), bool)
    for y0, x0 in t20["origins_yx"]:
        covered[y0 : y0 + 12, x0 : x0 + 12] = True
    assert covered.all()
    cube = crops["samson_cube"].copy()
    cube[:, :18, :18] = np.nan  # windows (0, 0), (0, 10) and (10, 0) are less than half valid
    holed = fit_scene(build_scene(cube, source="holed"), 3, seed=0, fit_tiles=20, **kw).provenance[
        "fit_tiles"
    ]
    assert holed["count"] == holed["usable_windows"] == 6
    assert not {(0, 0), (0, 10), (10, 0)} & {tuple(o) for o in holed["origins_yx"]}


def test_early_stopping_does_not_end_at_the_start_while_the_training_loss_falls(pavia_fit):
    """Pavia crop, default fit: patience does not stop the fit at its start state while the
    training loss still falls; the kept state is the best validated one and the record says why
    the fit stopped."""
    from workers.unmix.fit import training_loss_falls

    pv = pavia_fit.provenance
    curve = pv["loss_curve"]
    assert not (pv["stopped_early"] and pv["best_epoch"] == 0 and training_loss_falls(curve))
    assert pv["best_epoch"] > 0 and pv["kept_start"] is None
    assert pv["best_epoch"] == min(pv["val_curve"], key=lambda ev: ev[1])[0]
    assert pv["stop_reason"]
    # the training loss fell over the fit
    assert np.mean(curve[-10:]) < np.mean(curve[:10])


@pytest.fixture(scope="module")
def pavia_start_fit(pavia):
    """Five epochs on the Pavia crop (P = 8), default options (``mixing`` auto chooses the scaled
    model here): the one validated state is worse than the start."""
    return fit_scene(pavia, 8, seed=0, max_epochs=5)


def test_fit_that_keeps_its_start_says_why(pavia_start_fit):
    """The start is kept when no validated state beats it, and the record says why."""
    f = pavia_start_fit
    pv = f.provenance
    assert pv["mixing"]["model"] == "scaled" and f.model().scaled
    assert pv["best_epoch"] == 0 and pv["val_curve"][1][1] > pv["val_curve"][0][1]
    assert "lower held-out-band validation loss than the start" in pv["kept_start"]
    assert "max_epochs 5" in pv["kept_start"]
    start = pv["endmembers"]["start"]
    np.testing.assert_array_equal(
        f.endmembers, np.asarray([start[n] for n in f.names], dtype=np.float32).T
    )


def test_training_loss_falls_is_the_trend_of_the_whole_curve():
    from workers.unmix.fit import training_loss_falls

    rng = np.random.default_rng(0)
    noisy_fall = list(1.0 - 0.01 * np.arange(30) + 0.05 * rng.standard_normal(30))
    assert training_loss_falls(noisy_fall)
    assert not training_loss_falls(list(1.0 + 0.01 * np.arange(30)))
    assert not training_loss_falls([1.0]) and not training_loss_falls([])


@pytest.mark.parametrize("which", ["pavia_fit", "pavia_start_fit"])
def test_solver_converges_on_at_least_95_percent_of_pixels(pavia, which, request):
    """The Pavia crop with P = 8 (HySime's estimate; the hardest real case in the test data),
    unmixed whole with the trained fit and with a fit that kept its start (the plain projected
    gradient map): at least 95 % of the valid pixels reach the solver tolerance within the cap, and
    the tile's stats and the fit's record give the count."""
    from pipeline.scene import good_band_index

    fit = request.getfixturevalue(which)
    assert fit.n_endmembers == 8
    cube = np.asarray(pavia.isel(band=good_band_index(pavia)).values, dtype=np.float32)
    _, _, stats = apply_fit(fit, cube)
    assert stats["valid_pixels"] == 50 * 50
    assert stats["converged_pixels"] >= 0.95 * stats["valid_pixels"], stats
    solver = fit.provenance["solver_check"]
    assert solver["pixels"] == 32 * 32 and solver["converged_pixels"] >= 0.95 * solver["pixels"], (
        solver
    )


def test_one_module_shared_by_threads_unmixes_each_tile_as_alone(fitted, synthetic):
    """The tile engine's threads share one module per process: tiles of different sizes unmixed
    concurrently give what each gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    cube, _, _ = synthetic
    tiles = [cube, cube[:, :12, :20], cube[:, 5:, 3:17], cube[:, :20, :9]] * 2
    module = fitted.model()
    alone = [apply_fit(fitted, t, model=module)[0] for t in tiles]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda t: apply_fit(fitted, t, model=module)[0], tiles))
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a, b)
