"""Classical unmixing baselines on real spectra (USGS library crop shipped in tests/data/unmix)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from pipeline.errors import ConfigError, InputValidationError
from pipeline.metrics import match_endmembers, sad_degrees
from workers.unmix.classical import (
    estimate_n_endmembers,
    fcls,
    hysime,
    minvol,
    nfindr,
    noise_floor,
    vca,
)


@pytest.fixture(scope="module")
def usgs(test_data):
    z = np.load(test_data / "unmix" / "unmix_crops.npz")
    return z["usgs_spectra"].astype(np.float64)


def _mix(E: np.ndarray, n: int, seed: int, pure: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = E.shape[1]
    A = rng.dirichlet(np.ones(p), size=n).T
    if pure:
        A[:, :p] = np.eye(p)
    return E @ A, A


def test_fcls_equals_per_pixel_qp(usgs):
    E = usgs[:, :4]
    Y, _ = _mix(E, 40, seed=1, pure=False)
    Y = Y + 0.01 * np.random.default_rng(2).standard_normal(Y.shape)
    Y[:, 0] = 1.3 * E[:, 0] - 0.2 * E[:, 1]  # outside the simplex: active constraints
    A = fcls(Y, E)
    assert np.all(A >= 0)
    np.testing.assert_allclose(A.sum(axis=0), 1.0, atol=1e-6)
    for n in range(8):
        res = minimize(
            lambda a, y=Y[:, n]: 0.5 * np.sum((E @ a - y) ** 2),
            np.full(4, 0.25),
            jac=lambda a, y=Y[:, n]: E.T @ (E @ a - y),
            method="SLSQP",
            bounds=[(0, None)] * 4,
            constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1, "jac": lambda a: np.ones(4)}],
            options={"ftol": 1e-14, "maxiter": 500},
        )
        np.testing.assert_allclose(A[:, n], res.x, atol=2e-4)
    assert A[1, 0] < 1e-9  # the constrained pixel sits on the boundary


def test_fcls_many_endmembers_falls_back_to_loop(usgs):
    rng = np.random.default_rng(0)
    E = np.abs(rng.standard_normal((30, 11))) + 0.1
    Y, A_true = _mix(E, 15, seed=3, pure=False)
    A = fcls(Y, E)
    np.testing.assert_allclose(A, A_true, atol=1e-4)


@pytest.mark.parametrize("finder", [vca, nfindr])
def test_endmember_finders_recover_truth_noiseless(usgs, finder):
    E = usgs[:, :4]
    Y, _ = _mix(E, 2000, seed=4)
    E_est, idx = finder(Y, 4, seed=0)
    perm = match_endmembers(E, E_est)
    assert np.max(sad_degrees(E, E_est[:, perm])) < 1e-3
    assert sorted(idx.tolist()) == [0, 1, 2, 3]


def test_minvol_recovers_truth_without_pure_pixels(usgs):
    """No pixel holds more than 70 % of one endmember: VCA and N-FINDR can only return mixed
    pixels; the minimum-volume simplex lands near the true vertices (noiseless; the finite hinge
    weight lets a few sparse corner points stay outside, hence not exact)."""
    E = usgs[:, :4]
    rng = np.random.default_rng(7)
    A = rng.dirichlet(np.ones(4), size=6000).T
    A = A[:, A.max(axis=0) < 0.7]
    Y = E @ A
    E_mv, info = minvol(Y, 4, seed=0)
    assert 30 <= info["hinge"] <= 300
    sad_mv = sad_degrees(E, E_mv[:, match_endmembers(E, E_mv)])
    E_v, _ = vca(Y, 4, seed=0)
    sad_v = sad_degrees(E, E_v[:, match_endmembers(E, E_v)])
    assert np.mean(sad_mv) < 1.5 and np.mean(sad_mv) < 0.25 * np.mean(sad_v)
    with pytest.raises(ConfigError, match="start must be"):
        minvol(Y, 4, start=E[:, :3])
    with pytest.raises(ConfigError, match="hinge must be"):
        minvol(Y, 4, hinge=0.0)


@pytest.mark.parametrize("n", [400, 4000])
def test_noise_floor_matches_known_white_noise(usgs, n):
    """Also on samples not much larger than the band count: the regression noise estimate is
    corrected for its L - 1 coefficients (at 400 pixels of 224 bands it was 34 % low)."""
    Y, _ = _mix(usgs[:, :4], n, seed=8)
    sigma = 0.01
    Yn = Y + sigma * np.random.default_rng(9).standard_normal(Y.shape)
    L = Y.shape[0]
    assert noise_floor(Yn, 4) == pytest.approx(sigma * np.sqrt((L - 4) / L), rel=0.05)


def test_hysime_finds_number_of_endmembers(usgs):
    E = usgs[:, :5]
    Y, _ = _mix(E, 3000, seed=5)
    Y = Y + 1e-3 * np.random.default_rng(6).standard_normal(Y.shape)
    k, U = hysime(Y)
    assert k == 5 and U.shape == (E.shape[0], 5)
    p, rec = estimate_n_endmembers(Y, lo=2, hi=8)
    assert p == 5 and rec["method"] == "hysime"


def test_errors_say_what_to_do(usgs):
    Y, _ = _mix(usgs[:, :3], 50, seed=0)
    with pytest.raises(ConfigError, match="number of endmembers"):
        vca(Y, 1)
    Y[0, 0] = np.nan
    with pytest.raises(InputValidationError, match="drop nodata pixels"):
        nfindr(Y, 3)
    with pytest.raises(ConfigError, match="same good bands"):
        fcls(np.ones((5, 3)), usgs[:, :3])
