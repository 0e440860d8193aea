"""Quality metrics of the evaluation protocol (``docs/evaluation.md``).

Denoising metrics take a reference and an estimate cube ``(B, H, W)`` on the [0, 1] scale (peak
1); angles are in **degrees**. Unmixing metrics follow the linear mixing model ``Y = E·A``: ``E`` is
``L×P`` (endmembers as columns) and ``A`` is ``P×N``.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import ConfigError


def _pair(ref: np.ndarray, est: np.ndarray, ndim: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(ref, dtype=np.float64)
    e = np.asarray(est, dtype=np.float64)
    if r.shape != e.shape or r.ndim != ndim:
        raise ConfigError(
            f"{what}: reference and estimate must have the same {ndim}-D shape, got "
            f"{r.shape!r} and {e.shape!r}; align them before scoring"
        )
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(e))):
        raise ConfigError(
            f"{what}: inputs contain NaN or inf ({int(np.sum(~np.isfinite(r)))!r} in the "
            f"reference, {int(np.sum(~np.isfinite(e)))!r} in the estimate); "
            "score only valid pixels (crop or fill nodata first)"
        )
    return r, e


def band_psnr(ref: np.ndarray, est: np.ndarray, peak: float = 1.0) -> np.ndarray:
    """PSNR of each band in dB, ``10·log10(peak² / MSE_b)``; ``inf`` where a band is exact."""
    r, e = _pair(ref, est, 3, "band_psnr")
    mse = np.mean((r - e) ** 2, axis=(1, 2))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(peak**2 / mse)


def mpsnr(ref: np.ndarray, est: np.ndarray, peak: float = 1.0) -> float:
    """Mean over bands of the per-band PSNR (dB): not a whole-cube MSE. ``inf`` if identical."""
    return float(np.mean(band_psnr(ref, est, peak)))


def band_ssim(ref: np.ndarray, est: np.ndarray) -> np.ndarray:
    """SSIM of each band: 11×11 Gaussian window σ = 1.5, K1 = 0.01, K2 = 0.03, data range 1,
    population covariance (scikit-image's Wang et al. settings)."""
    from skimage.metrics import structural_similarity

    r, e = _pair(ref, est, 3, "band_ssim")
    return np.array(
        [
            structural_similarity(
                r[b],
                e[b],
                data_range=1.0,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                K1=0.01,
                K2=0.03,
            )
            for b in range(r.shape[0])
        ]
    )


def mssim(ref: np.ndarray, est: np.ndarray) -> float:
    """Mean over bands of :func:`band_ssim`."""
    return float(np.mean(band_ssim(ref, est)))


def _angles_deg(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    """Angle between vectors along ``axis`` in degrees; 0° if both are zero, 90° if one is."""
    dot = np.sum(x * y, axis=axis)
    nx = np.linalg.norm(x, axis=axis)
    ny = np.linalg.norm(y, axis=axis)
    denom = nx * ny
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), 0.0)
    cos = np.where((nx == 0) & (ny == 0), 1.0, cos)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def sam_degrees(ref: np.ndarray, est: np.ndarray) -> float:
    """Spectral angle mapper: mean over pixels of the angle between spectra, in degrees."""
    r, e = _pair(ref, est, 3, "sam_degrees")
    return float(np.mean(_angles_deg(r, e, axis=0)))


def ergas(ref: np.ndarray, est: np.ndarray) -> float:
    """ERGAS (Wald) with resolution ratio 1: ``100·sqrt(mean_b RMSE_b² / μ_b²)``, μ_b the
    reference band mean; ``inf`` if a reference band has zero mean and a non-zero error."""
    r, e = _pair(ref, est, 3, "ergas")
    mse = np.mean((r - e) ** 2, axis=(1, 2))
    mu2 = np.mean(r, axis=(1, 2)) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(mse == 0, 0.0, mse / mu2)
    return float(100.0 * np.sqrt(np.mean(ratio)))


# ---------------------------------------------------------------- unmixing


def sad_matrix(ref_e: np.ndarray, est_e: np.ndarray) -> np.ndarray:
    """``P×P`` spectral angle (degrees) between reference column i and estimated column j."""
    r = np.asarray(ref_e, dtype=np.float64)
    e = np.asarray(est_e, dtype=np.float64)
    if r.ndim != 2 or r.shape != e.shape:
        raise ConfigError(
            f"endmember matrices must both be L×P, got {r.shape!r} and {e.shape!r}; "
            "put endmembers as columns"
        )
    return _angles_deg(r[:, :, None], e[:, None, :], axis=0)


def match_endmembers(ref_e: np.ndarray, est_e: np.ndarray) -> np.ndarray:
    """Permutation ``perm`` minimising the total SAD: ``est_e[:, perm]`` lines up with ``ref_e``.

    Hungarian assignment (``scipy.optimize.linear_sum_assignment``) on :func:`sad_matrix`; apply
    the same permutation to the abundance rows (``est_a[perm]``).
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(sad_matrix(ref_e, est_e))
    perm = np.empty_like(cols)
    perm[rows] = cols
    return perm


def sad_degrees(ref_e: np.ndarray, est_e: np.ndarray) -> np.ndarray:
    """SAD of each endmember (degrees), column i of ``ref_e`` against column i of ``est_e``.

    Match first (:func:`match_endmembers`); the mean SAD is ``sad_degrees(...).mean()``.
    """
    return np.diagonal(sad_matrix(ref_e, est_e)).copy()


def abundance_rmse(ref_a: np.ndarray, est_a: np.ndarray) -> tuple[float, np.ndarray]:
    """Abundance RMSE: overall ``sqrt(mean over endmembers and pixels of (â − a)²)`` and the
    per-endmember RMSE (length P). ``A`` is ``P×N`` (rows already matched)."""
    r, e = _pair(ref_a, est_a, 2, "abundance_rmse")
    sq = (r - e) ** 2
    return float(np.sqrt(sq.mean())), np.sqrt(sq.mean(axis=1))
