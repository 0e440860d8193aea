"""Protocol metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.metrics import (
    abundance_rmse,
    band_psnr,
    band_ssim,
    ergas,
    match_endmembers,
    mpsnr,
    mssim,
    sad_degrees,
    sad_matrix,
    sam_degrees,
)


@pytest.fixture(scope="module")
def pavia(test_data) -> np.ndarray:
    return np.load(test_data / "denoise_eval" / "crops.npz")["pavia_centre"].astype(np.float64)


def test_identical_cubes(pavia):
    assert mpsnr(pavia, pavia) == math.inf
    assert mssim(pavia, pavia) == pytest.approx(1.0)
    assert sam_degrees(pavia, pavia) == pytest.approx(0.0, abs=1e-5)
    assert ergas(pavia, pavia) == 0.0


def test_constant_error_gives_known_psnr_and_ergas(pavia):
    est = pavia + 0.01  # MSE 1e-4 in every band -> 40 dB
    assert mpsnr(pavia, est) == pytest.approx(40.0)
    mu = pavia.mean(axis=(1, 2))
    assert ergas(pavia, est) == pytest.approx(100 * math.sqrt(np.mean(1e-4 / mu**2)))


def test_mpsnr_is_mean_of_band_psnr_not_whole_cube():
    ref = np.zeros((2, 4, 4))
    est = ref.copy()
    est[0] += 0.1  # band 0: 20 dB
    est[1] += 0.01  # band 1: 40 dB
    np.testing.assert_allclose(band_psnr(ref, est), [20.0, 40.0])
    assert mpsnr(ref, est) == pytest.approx(30.0)
    whole = 10 * math.log10(1 / np.mean((ref - est) ** 2))
    assert abs(mpsnr(ref, est) - whole) > 1.0


def test_sam_orthogonal_and_scaled():
    ref = np.zeros((2, 1, 2))
    est = np.zeros((2, 1, 2))
    ref[:, 0, 0], est[:, 0, 0] = [1, 0], [0, 1]  # 90°
    ref[:, 0, 1], est[:, 0, 1] = [1, 1], [3, 3]  # 0°: SAM ignores scale
    assert sam_degrees(ref, est) == pytest.approx(45.0)


def test_ssim_matches_known_properties(pavia):
    rng = np.random.default_rng(0)
    noisy = pavia + rng.normal(0, 0.05, pavia.shape)
    per_band = band_ssim(pavia, noisy)
    assert per_band.shape == (pavia.shape[0],)
    assert np.all(per_band < 1) and mssim(pavia, noisy) == pytest.approx(per_band.mean())
    # more noise -> lower SSIM
    assert mssim(pavia, pavia + rng.normal(0, 0.2, pavia.shape)) < mssim(pavia, noisy)


def test_shape_and_nan_errors(pavia):
    with pytest.raises(ConfigError, match=r"same 3-D shape.*\(102, 32, 32\).*\(102, 32, 31\)"):
        mpsnr(pavia, pavia[:, :, :31])
    bad = pavia.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN or inf"):
        mpsnr(pavia, bad)


def test_endmember_matching_recovers_permutation():
    rng = np.random.default_rng(3)
    ref = rng.random((50, 4))
    perm_true = np.array([2, 0, 3, 1])
    est = np.empty_like(ref)
    est[:, perm_true] = ref * 1.5 + rng.normal(0, 0.01, ref.shape)  # scaled + small noise
    perm = match_endmembers(ref, est)
    np.testing.assert_array_equal(perm, perm_true)
    sads = sad_degrees(ref, est[:, perm])
    assert sads.shape == (4,) and np.all(sads < 2.0)
    assert sad_matrix(ref, est).shape == (4, 4)


def test_sad_orthogonal_endmembers_is_90():
    ref = np.eye(3)[:, :2]
    est = np.eye(3)[:, [1, 0]]
    np.testing.assert_allclose(sad_degrees(ref, est), [90.0, 90.0])
    np.testing.assert_array_equal(match_endmembers(ref, est), [1, 0])


def test_abundance_rmse_by_hand():
    ref = np.array([[0.5, 0.5, 1.0, 0.0], [0.5, 0.5, 0.0, 1.0]])
    est = ref.copy()
    est[0] += 0.1
    overall, per = abundance_rmse(ref, est)
    np.testing.assert_allclose(per, [0.1, 0.0])
    assert overall == pytest.approx(math.sqrt(0.01 / 2))
