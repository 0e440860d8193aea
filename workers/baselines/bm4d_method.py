"""BM4D (package ``bm4d``) with the protocol's oracle σ."""

from __future__ import annotations

import numpy as np

from workers.baselines.base import CaseInfo


def denoise(noisy: np.ndarray, info: CaseInfo) -> np.ndarray:
    """BM4D on the (y, x, band) volume with σ = RMS of the per-band σ; returns ``(B, H, W)``."""
    import bm4d

    vol = np.ascontiguousarray(noisy.transpose(1, 2, 0))
    out = bm4d.bm4d(vol, info.oracle_sigma)
    return np.asarray(out).transpose(2, 0, 1)
