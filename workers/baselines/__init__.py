"""Classical hyperspectral denoisers used as anchors by ``hyperdeq eval denoiser``.

Every baseline has one signature, ``denoise(noisy, info) -> cube``: ``noisy`` is ``(B, H, W)`` on
the [0, 1] scale and ``info`` a :class:`CaseInfo` describing the noise case (whether it is i.i.d.
Gaussian and the per-band σ, used only where the protocol gives a method an oracle σ). The third
party packages are optional (the ``baselines`` extra, installed with ``pip install --no-deps``);
:func:`availability` says why one cannot run instead of failing at import time.
"""

from __future__ import annotations

from workers.baselines.base import (
    BASELINE_NAMES,
    Baseline,
    CaseInfo,
    availability,
    get_baseline,
)

__all__ = ["BASELINE_NAMES", "Baseline", "CaseInfo", "availability", "get_baseline"]
