"""FastHyDe, L1HyMixDe and WSRRR from ``hyde-images`` (torch implementations, run on CPU)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from workers.baselines.base import CaseInfo

# protocol settings (docs/evaluation.md)
FASTHYDE_K = 10
L1HYMIXDE_K = 8
L1HYMIXDE_P = 0.1
L1HYMIXDE_ITERS = 10
WSRRR_RANK = 10


def _to_hwb(noisy: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(noisy.transpose(1, 2, 0)))


def _to_bhw(out: torch.Tensor) -> np.ndarray:
    return out.detach().cpu().numpy().transpose(2, 0, 1)


def _run(noisy: np.ndarray, call) -> np.ndarray:  # type: ignore[no-untyped-def]
    import hyde

    x = _to_hwb(noisy)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = call(hyde, x)
    return _to_bhw(out)


def fasthyde(noisy: np.ndarray, info: CaseInfo) -> np.ndarray:
    """FastHyDe, k = 10 eigen-images; ``iid`` from the noise case (False for non-i.i.d. noise)."""
    return _run(
        noisy,
        lambda hyde, x: hyde.FastHyDe()(
            x, noise_type="additive", iid=info.iid, k_subspace=FASTHYDE_K
        ),
    )


def l1hymixde(noisy: np.ndarray, info: CaseInfo) -> np.ndarray:
    """L1HyMixDe (mixed Gaussian + impulse/stripe noise), k = 8, p = 0.1, 10 iterations."""
    return _run(
        noisy,
        lambda hyde, x: hyde.L1HyMixDe()(
            x, k_subspace=L1HYMIXDE_K, p=L1HYMIXDE_P, max_iter=L1HYMIXDE_ITERS
        ),
    )


def wsrrr(noisy: np.ndarray, info: CaseInfo) -> np.ndarray:
    """WSRRR (wavelet-based sparse reduced-rank regression), rank 10."""
    # WSRRR returns (denoised cube, principal components)
    return _run(noisy, lambda hyde, x: hyde.WSRRR()(x, rank=WSRRR_RANK)[0])
