"""Noise generators of the denoising protocol, checked on a real Jasper Ridge crop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.noise import (
    NOISE_CASES,
    add_noise,
    add_noise_with_info,
    is_iid_gaussian,
    noise_sigmas,
    oracle_sigma,
)


@pytest.fixture(scope="module")
def clean(test_data) -> np.ndarray:
    z = np.load(test_data / "denoise_eval" / "crops.npz")
    dn = z["jasper_dn"].astype(np.float64)
    lo, hi = float(z["jasper_full_min"]), float(z["jasper_full_max"])
    return ((dn - lo) / (hi - lo)).astype(np.float32)


def test_unknown_case_lists_valid_ones(clean):
    with pytest.raises(ConfigError, match=r"unknown noise case 'gauss40'.*'gauss30'.*'mixture'"):
        add_noise(clean, "gauss40", np.random.default_rng(0))


def test_rejects_2d_and_integer_cubes(clean):
    with pytest.raises(ConfigError, match=r"must be 3-D .*\(32, 32\)"):
        add_noise(clean[0], "gauss30", np.random.default_rng(0))
    with pytest.raises(ConfigError, match="must be float"):
        add_noise((clean * 1000).astype(np.uint16), "gauss30", np.random.default_rng(0))


@pytest.mark.parametrize("case,sigma", [("gauss30", 30 / 255), ("gauss50", 50 / 255)])
def test_iid_gaussian_sigma_matches(clean, case, sigma):
    noisy = add_noise(clean, case, np.random.default_rng(1))
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape
    resid = noisy.astype(np.float64) - clean
    assert abs(resid.mean()) < 0.05 * sigma
    assert resid.std() == pytest.approx(sigma, rel=0.01)
    assert is_iid_gaussian(case)


def test_blind_sigma_in_range_and_shared_by_all_bands(clean):
    for seed in range(5):
        sig = noise_sigmas("blind", clean.shape[0], np.random.default_rng(seed))
        assert np.all(sig == sig[0]) and 10 / 255 <= sig[0] <= 70 / 255
        resid = add_noise(clean, "blind", np.random.default_rng(seed)) - clean
        assert resid.std() == pytest.approx(sig[0], rel=0.02)


@pytest.mark.parametrize("case,smax", [("band[0,15]", 15), ("band[0,55]", 55), ("band[0,95]", 95)])
def test_band_dependent_sigma_matches_per_band(clean, case, smax):
    noisy, sig, groups = add_noise_with_info(clean, case, np.random.default_rng(3))
    assert groups is None and not is_iid_gaussian(case)
    # the same seed gives the same σ through noise_sigmas (it is drawn first)
    np.testing.assert_array_equal(sig, noise_sigmas(case, clean.shape[0], np.random.default_rng(3)))
    assert sig.min() >= 0 and sig.max() <= smax / 255
    assert sig.std() > smax / 255 / 5  # really band dependent, not one σ
    emp = (noisy.astype(np.float64) - clean).reshape(clean.shape[0], -1).std(axis=1)
    # 1024 pixels per band: the σ estimate is within ~2.2 % (1 s.d.); allow 5 s.d. + float32 floor
    np.testing.assert_allclose(emp, sig, rtol=0.12, atol=2e-6)
    assert oracle_sigma(sig) == pytest.approx(math.sqrt(np.mean(sig**2)))


def test_corr_profile(clean):
    n = clean.shape[0]
    sig = noise_sigmas("corr", n, np.random.default_rng(0))
    # peak 23.08/255 at b/B = 0.5; value at b = 1 from the formula by hand
    assert sig.max() == pytest.approx(23.08 / 255, rel=1e-3)
    assert int(np.argmax(sig)) + 1 == n // 2
    expected_first = 23.08 * math.exp(-((1 / n - 0.5) ** 2) / (4 * 0.157**2)) / 255
    assert sig[0] == pytest.approx(expected_first)
    emp = (add_noise(clean, "corr", np.random.default_rng(0)) - clean).reshape(n, -1).std(axis=1)
    np.testing.assert_allclose(emp, sig, rtol=0.12)


def test_mixture_groups_disjoint_and_sized(clean):
    n, h, w = clean.shape
    noisy, sig, groups = add_noise_with_info(clean, "mixture", np.random.default_rng(7))
    assert groups is not None
    sets = [set(groups.stripes), set(groups.deadlines), set(groups.impulse)]
    assert [len(s) for s in sets] == [n // 3] * 3
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set(np.round(sig * 255).astype(int)) <= {10, 30, 50, 70}
    lo, hi = math.ceil(0.05 * w), math.ceil(0.15 * w)
    for b in groups.deadlines:
        dead_cols = np.flatnonzero(np.all(noisy[b] == 0.0, axis=0))
        assert lo <= dead_cols.size <= hi
    for b in groups.impulse:
        frac = np.mean((noisy[b] == 0.0) | (noisy[b] == 1.0))
        assert 0.05 < frac < 0.75
    # outside the dead columns, dead-line bands carry exactly their Gaussian σ
    for b in groups.deadlines[:10]:
        live = ~np.all(noisy[b] == 0.0, axis=0)
        emp = (noisy[b][:, live].astype(np.float64) - clean[b][:, live]).std()
        assert emp == pytest.approx(sig[b], rel=0.15)
    b = groups.stripes[0]
    col_means = (noisy[b].astype(np.float64) - clean[b]).mean(axis=0)
    shifted = np.sum(np.abs(col_means) > 5 * sig[b] / math.sqrt(h))
    assert 1 <= shifted <= hi
    assert np.abs(col_means).max() <= 0.25 + 5 * sig[b] / math.sqrt(h)


@pytest.mark.parametrize("case", NOISE_CASES)
def test_seeded_reproducibility(clean, case):
    a = add_noise(clean, case, np.random.default_rng(42))
    b = add_noise(clean, case, np.random.default_rng(42))
    c = add_noise(clean, case, np.random.default_rng(43))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
