"""Seeded noise generators for the denoising protocol (``../shared/PROTOCOL.md``, docs/evaluation.md).

All σ values in the protocol are on the 0–255 scale; here they are divided by 255 so that they
apply to a clean cube in [0, 1]. Cubes are ``(B, H, W)`` (band, y, x). Every random draw comes
from the caller's ``np.random.Generator``, so a seed reproduces the noisy cube exactly.

The per-band σ are drawn first (:func:`noise_sigmas`), then the noise itself; calling
:func:`noise_sigmas` with a generator seeded like the one given to :func:`add_noise` therefore
returns the σ that :func:`add_noise` used (BM4D's oracle σ is their RMS, :func:`oracle_sigma`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError

NOISE_CASES: tuple[str, ...] = (
    "gauss30",
    "gauss50",
    "blind",
    "band[0,15]",
    "band[0,55]",
    "band[0,95]",
    "corr",
    "mixture",
)

# cases whose noise is i.i.d. Gaussian (one σ for every band and pixel)
IID_GAUSSIAN_CASES: frozenset[str] = frozenset({"gauss30", "gauss50", "blind"})

_BAND_SIGMA_MAX = {"band[0,15]": 15.0, "band[0,55]": 55.0, "band[0,95]": 95.0}
_CORR_BETA = 23.08
_CORR_ETA = 0.157
_MIXTURE_SIGMAS = (10.0, 30.0, 50.0, 70.0)
_IMPULSE_DENSITIES = (0.1, 0.3, 0.5, 0.7)


@dataclass(frozen=True)
class MixtureGroups:
    """Band indices that received each structured noise in the ``mixture`` case (disjoint)."""

    stripes: tuple[int, ...]
    deadlines: tuple[int, ...]
    impulse: tuple[int, ...]


def check_case(case: str) -> str:
    """Return ``case`` if it is a protocol noise case, else raise :class:`ConfigError`."""
    if case not in NOISE_CASES:
        raise ConfigError(
            f"unknown noise case {case!r}; valid cases are {list(NOISE_CASES)!r} "
            "(see docs/evaluation.md)"
        )
    return case


def is_iid_gaussian(case: str) -> bool:
    """True for the cases whose noise is i.i.d. Gaussian (FastHyDe runs with ``iid=True``)."""
    return check_case(case) in IID_GAUSSIAN_CASES


def noise_sigmas(case: str, n_bands: int, rng: np.random.Generator) -> np.ndarray:
    """Per-band Gaussian σ (on the [0, 1] scale) of ``case`` for ``n_bands`` bands.

    This is the first thing :func:`add_noise` draws from ``rng``. In the ``mixture`` case it is
    the σ of the Gaussian part only (stripes, dead lines and impulses are not Gaussian).
    """
    check_case(case)
    if n_bands < 1:
        raise ConfigError(f"n_bands must be >= 1, got {n_bands!r}")
    if case in ("gauss30", "gauss50"):
        sig = np.full(n_bands, float(case[5:]))
    elif case == "blind":
        sig = np.full(n_bands, rng.uniform(10.0, 70.0))
    elif case in _BAND_SIGMA_MAX:
        sig = rng.uniform(0.0, _BAND_SIGMA_MAX[case], size=n_bands)
    elif case == "corr":
        # bands counted from 1 as in the MATLAB protocols this formula comes from
        b = np.arange(1, n_bands + 1, dtype=np.float64)
        sig = _CORR_BETA * np.exp(-((b / n_bands - 0.5) ** 2) / (4.0 * _CORR_ETA**2))
    else:  # mixture
        sig = rng.choice(np.asarray(_MIXTURE_SIGMAS), size=n_bands)
    return (np.asarray(sig, dtype=np.float64) / 255.0).astype(np.float64)


def oracle_sigma(sigmas: np.ndarray) -> float:
    """The single σ given to BM4D as an oracle: the RMS of the per-band σ."""
    s = np.asarray(sigmas, dtype=np.float64)
    return float(np.sqrt(np.mean(s**2)))


def _check_clean(clean: np.ndarray) -> np.ndarray:
    arr = np.asarray(clean)
    if arr.ndim != 3:
        raise ConfigError(
            f"clean cube must be 3-D (band, y, x), got shape {arr.shape!r}; "
            "transpose (y, x, band) cubes with cube.transpose(2, 0, 1)"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise ConfigError(
            f"clean cube must be float in [0, 1], got dtype {arr.dtype!r}; "
            "scale it first (divide by its full scale or min-max over the whole cube)"
        )
    return arr


def _columns(rng: np.random.Generator, width: int) -> np.ndarray:
    """Distinct random columns, n ~ U[ceil(0.05 W), ceil(0.15 W)] of them."""
    lo, hi = math.ceil(0.05 * width), math.ceil(0.15 * width)
    n = min(int(rng.integers(lo, hi + 1)), width)
    return rng.choice(width, size=n, replace=False)


def add_noise_with_info(
    clean: np.ndarray, case: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, MixtureGroups | None]:
    """Noisy cube (float32), per-band Gaussian σ used, and the mixture groups (or None).

    ``clean`` is ``(B, H, W)`` float in [0, 1]. The output is *not* clipped: the protocol scores
    the denoised output clamped to [0, 1], and the noisy input is what the sensor would give.
    """
    arr = _check_clean(clean).astype(np.float64)
    check_case(case)
    n_bands, height, width = arr.shape
    sig = noise_sigmas(case, n_bands, rng)
    noisy = arr + rng.standard_normal(arr.shape) * sig[:, None, None]
    groups: MixtureGroups | None = None
    if case == "mixture":
        size = n_bands // 3
        perm = rng.permutation(n_bands)
        stripes, dead, impulse = (np.sort(perm[i * size : (i + 1) * size]) for i in range(3))
        for b in stripes:
            cols = _columns(rng, width)
            noisy[b][:, cols] += rng.uniform(-0.25, 0.25, size=cols.size)[None, :]
        for b in dead:
            noisy[b][:, _columns(rng, width)] = 0.0
        for b in impulse:
            density = float(rng.choice(np.asarray(_IMPULSE_DENSITIES)))
            hit = rng.random((height, width)) < density
            salt = rng.random((height, width)) < 0.5
            noisy[b][hit & salt] = 1.0
            noisy[b][hit & ~salt] = 0.0
        groups = MixtureGroups(
            tuple(int(b) for b in stripes),
            tuple(int(b) for b in dead),
            tuple(int(b) for b in impulse),
        )
    return noisy.astype(np.float32), sig, groups


def add_noise(clean: np.ndarray, case: str, rng: np.random.Generator) -> np.ndarray:
    """Add the protocol's noise ``case`` to ``clean`` (``(B, H, W)`` in [0, 1]); float32 result."""
    return add_noise_with_info(clean, case, rng)[0]
