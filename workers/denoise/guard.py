"""Band guard: hand part of the noisy input back where DECSC over-smooths a band.

DECSC synthesises every band of a 31-band window from one shared code, so a band that is nearly
clean while its neighbours are noisy (``band[0,95]``: σ_b drawn uniformly from 0 to 95/255) is
smoothed like its neighbours and ends up *worse* than its input. The guard blends per band

    out_b = d_b + w_b · (y_b − d_b),    w_b = g(features_b) ∈ [0, 1]

(``y`` the noisy input, ``d`` the DECSC output). ``g`` is a tiny MLP over scale-free statistics of
the removed residual ``r = y − d`` (its energy against the blind noise estimate, its correlation
with the output's edges and with the neighbouring bands' residuals, its outlier and line
fractions), trained on real training cubes (never the test scenes; :mod:`workers.denoise.guard_train`)
to minimise the mean per-band log-MSE, i.e. to maximise MPSNR. A fixed rule cannot do this: the SURE-optimal blend
``1 − w = σ̂²(1 − div/n) / mean(r²)`` gains +0.6 dB on Jasper Ridge ``band[0,95]`` but hands
stripes, dead lines and impulses back in the ``mixture`` case (−2.4 dB), and simple gates that
protect ``mixture`` also remove the gain (``docs/models/decsc.md``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError, WeightsError

FEATURES = (
    "log_sigma",  # log10 of the blind noise estimate σ̂_b
    "log_residual_energy",  # log10 mean(r²)/σ̂²: 0 when exactly the noise was removed
    "log_residual_mad",  # log10 of the robust scale of r over σ̂
    "edge_corr",  # correlation of |r| with the output's gradient magnitude (signal loss at edges)
    "neighbour_corr",  # mean correlation of r with the neighbouring bands' r (shared smoothing)
    "outliers_3",  # fraction of |r| > 3σ̂
    "outliers_6",  # fraction of |r| > 6σ̂ (impulses, dead lines)
    "lines",  # fraction of columns or rows whose median r is off by > 5 standard errors (stripes)
    "log_relative_sigma",  # log10 σ̂_b over the median σ̂ of the cube (band-dependent noise)
    "log_level",  # log10 mean |d| (brightness)
)
GUARD_FILE = (
    Path(__file__).resolve().parents[1] / "weights" / "decsc_guard.safetensors"
)  # sha256 in spec.py
_EPS = 1e-12


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of two (B, n) arrays (0 where either is constant)."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return np.where(den > _EPS, (a * b).sum(axis=1) / np.maximum(den, _EPS), 0.0)


def band_features(
    y: np.ndarray, d: np.ndarray, sigma: np.ndarray, valid: np.ndarray | None = None
) -> np.ndarray:
    """``(B, len(FEATURES))`` float32 features of one cube: ``y`` noisy, ``d`` denoised, both
    ``(B, H, W)`` without NaN (nodata filled), ``sigma`` the ``(B,)`` blind noise estimate,
    ``valid`` the ``(H, W)`` mask of real pixels (None: all); filled pixels are left out."""
    y = np.asarray(y, np.float64)
    d = np.asarray(d, np.float64)
    b, h, w = y.shape
    ok = np.ones((h, w), bool) if valid is None else np.asarray(valid, bool)
    if ok.shape != (h, w) or not ok.any():
        raise ConfigError(
            f"band guard: valid mask of shape {ok.shape!r} with {int(ok.sum())} pixels for a "
            f"{h}x{w} cube; give a (H, W) mask with at least one valid pixel"
        )
    s = np.maximum(np.asarray(sigma, np.float64), 1e-5)
    r = y - d
    px = ok.ravel()
    rf = r.reshape(b, -1)[:, px]
    gy = np.abs(np.diff(d, axis=1, append=d[:, -1:, :]))
    gx = np.abs(np.diff(d, axis=2, append=d[:, :, -1:]))
    # gradients only where the pixel and its lower and right neighbours are real
    ok_g = (
        ok
        & np.concatenate([ok[1:], ok[-1:]], axis=0)
        & np.concatenate([ok[:, 1:], ok[:, -1:]], axis=1)
    ).ravel()
    edge = (
        _corr(np.abs(r.reshape(b, -1)[:, ok_g]), (gx + gy).reshape(b, -1)[:, ok_g])
        if ok_g.any()
        else np.zeros(b)
    )
    if b > 1:
        c = _corr(rf[1:], rf[:-1])  # correlation of band k with band k - 1
        nb = np.zeros(b)
        cnt = np.zeros(b)
        nb[1:] += c
        cnt[1:] += 1
        nb[:-1] += c
        cnt[:-1] += 1
        nb /= cnt
    else:
        nb = np.zeros(b)
    med = np.median(rf, axis=1, keepdims=True)
    mad = 1.4826 * np.median(np.abs(rf - med), axis=1)
    absr = np.abs(rf)
    # line medians over real pixels; standard error of a median ≈ 1.253 σ / sqrt(n)
    n_col, n_row = ok.sum(axis=0), ok.sum(axis=1)
    if ok.all():
        col_med, row_med = np.median(r, axis=1), np.median(r, axis=2)
    else:
        rm = np.where(ok[None], r, np.nan)
        col_med = np.nanmedian(rm[:, :, n_col > 0], axis=1)
        row_med = np.nanmedian(rm[:, n_row > 0, :], axis=2)
        n_col, n_row = n_col[n_col > 0], n_row[n_row > 0]
    cols = (np.abs(col_med) > 5 * 1.253 * s[:, None] / np.sqrt(n_col)[None, :]).mean(axis=1)
    rows = (np.abs(row_med) > 5 * 1.253 * s[:, None] / np.sqrt(n_row)[None, :]).mean(axis=1)
    feats = np.stack(
        [
            np.log10(s),
            np.log10((rf**2).mean(axis=1) / s**2 + 1e-6),
            np.log10(mad / s + 1e-6),
            edge,
            nb,
            (absr > 3 * s[:, None]).mean(axis=1),
            (absr > 6 * s[:, None]).mean(axis=1),
            np.maximum(cols, rows),
            np.log10(s / np.median(s)),
            np.log10(np.abs(d).reshape(b, -1)[:, px].mean(axis=1) + 1e-3),
        ],
        axis=1,
    )
    return np.nan_to_num(feats, nan=0.0, posinf=6.0, neginf=-6.0).astype(np.float32)


def gain_terms(clean: np.ndarray, y: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Per band ``(A, B, C)`` with ``mse(w) = A + 2wB + w²C`` for ``d + w(y − d)`` vs ``clean``."""
    b = clean.shape[0]
    e = (np.asarray(d, np.float64) - clean).reshape(b, -1)
    r = (np.asarray(y, np.float64) - d).reshape(b, -1)
    return np.stack([(e * e).mean(1), (e * r).mean(1), (r * r).mean(1)], axis=1).astype(np.float64)


class BandGuard(nn.Module):
    """``features (N, F) -> w (N,)`` in [0, 1]: standardisation, one hidden layer, sigmoid."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        f = len(FEATURES)
        self.register_buffer("mean", torch.zeros(f))
        self.register_buffer("std", torch.ones(f))
        self.net = nn.Sequential(nn.Linear(f, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        last = self.net[2]
        assert isinstance(last, nn.Linear)
        with torch.no_grad():  # start near "keep the denoiser's output" (w ≈ 0.05)
            last.bias.fill_(-3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net((x - self.mean) / self.std))[:, 0]


def guard_loss(w: torch.Tensor, abc: torch.Tensor) -> torch.Tensor:
    """Mean per-band log10 MSE of the blended output (what MPSNR averages, negated / 10)."""
    mse = abc[:, 0] + 2 * w * abc[:, 1] + w * w * abc[:, 2]
    return torch.log10(mse.clamp_min(1e-10)).mean()


def fit_guard(
    X: np.ndarray,
    abc: np.ndarray,
    *,
    seed: int = 0,
    steps: int = 3000,
    lr: float = 1e-2,
    hidden: int = 16,
    weight_decay: float = 1e-4,
) -> BandGuard:
    """Fit a :class:`BandGuard` to features ``X (N, F)`` and gain terms ``abc (N, 3)`` (full batch Adam)."""
    if X.ndim != 2 or X.shape[1] != len(FEATURES) or abc.shape != (X.shape[0], 3):
        raise ConfigError(
            f"guard training data has shapes {X.shape!r} / {abc.shape!r}; expected (N, {len(FEATURES)}) / (N, 3)"
        )
    torch.manual_seed(seed)
    g = BandGuard(hidden)
    xt = torch.from_numpy(X.astype(np.float32))
    at = torch.from_numpy(abc.astype(np.float64))
    g.mean.copy_(xt.mean(0))
    g.std.copy_(xt.std(0).clamp_min(1e-3))
    opt = torch.optim.Adam(g.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = guard_loss(g(xt).double(), at)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return g.eval()


def guard_weights(
    guard: BandGuard,
    y: np.ndarray,
    d: np.ndarray,
    sigma: np.ndarray,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Per-band ``w`` (float32) for one NaN-free ``(B, H, W)`` cube (``valid``: its real pixels)."""
    feats = band_features(y, d, sigma, valid)
    with torch.no_grad():
        return guard(torch.from_numpy(feats)).numpy().astype(np.float32)


def apply_guard(
    guard: BandGuard,
    y: np.ndarray,
    d: np.ndarray,
    sigma: np.ndarray,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(d + w(y − d), w)`` for one NaN-free ``(B, H, W)`` cube (``valid``: its real pixels); ``w`` per band."""
    w = guard_weights(guard, y, d, sigma, valid)
    out = d + w[:, None, None] * (y - d)
    return out.astype(np.float32), w


def scene_weights(tile_stats: Any) -> np.ndarray | None:
    """One weight per band for a whole scene from its tiles' guard reports (``stats`` dicts with
    ``guard_w`` and ``guard_n``): the mean of the tiles' weights, weighted by their valid pixels.
    ``None`` when no tile reported weights (guard off). Tiles of one scene must agree on the bands."""
    ws, ns = [], []
    for st in tile_stats:
        if st and st.get("guard_w") is not None and int(st.get("guard_n", 0)) > 0:
            ws.append(np.asarray(st["guard_w"], dtype=np.float64))
            ns.append(float(st["guard_n"]))
    if not ws:
        return None
    if len({w.shape for w in ws}) != 1:
        raise ConfigError(
            f"tiles reported guard weights for different band counts {sorted({w.size for w in ws})!r}"
        )
    return (np.average(np.stack(ws), axis=0, weights=np.asarray(ns))).astype(np.float32)


def guard_state(guard: BandGuard) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in guard.state_dict().items()}


def save_guard(guard: BandGuard, path: Path, meta: dict[str, Any]) -> str:
    """Write the guard as safetensors with string metadata; returns its sha256."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    first = guard.net[0]
    assert isinstance(first, nn.Linear)
    hidden = int(first.out_features)
    meta = {
        **meta,
        "format": "hyperdeq-decsc-guard/1",
        "features": list(FEATURES),
        "hidden": hidden,
    }
    save_file(
        guard_state(guard),
        str(path),
        metadata={k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()},
    )
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_guard(path: str | Path | None = None) -> BandGuard:
    """The shipped guard (or ``path``); a clear error when the file is missing or does not fit."""
    from safetensors import safe_open

    from workers.registry import sha256_file

    from .spec import GUARD_WEIGHTS_SHA256

    p = Path(path) if path is not None else GUARD_FILE
    if not p.is_file():
        raise WeightsError(
            f"band-guard weights {str(p)!r} not found; reinstall hyperdeq or pass guard=False"
        )
    digest = sha256_file(p) if path is None else None
    if digest is not None and digest != GUARD_WEIGHTS_SHA256:
        raise WeightsError(
            f"band-guard weights {str(p)!r} have sha256 {digest!r}, expected {GUARD_WEIGHTS_SHA256!r}: "
            "the file was modified; reinstall hyperdeq (or retrain with `hyperdeq train guard --install`)"
        )
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
        if json.loads(meta.get("features", "[]")) != list(FEATURES):
            raise WeightsError(
                f"band-guard file {str(p)!r} was trained on other features: {meta.get('features')!r}"
            )
        g = BandGuard(int(meta.get("hidden", "16")))
        g.load_state_dict(state, strict=True)
    except WeightsError:
        raise
    except Exception as exc:  # safetensors / torch raise several types for a corrupt file
        raise WeightsError(
            f"band-guard weights {str(p)!r} cannot be read ({exc}); reinstall hyperdeq"
        ) from exc
    return g.eval()
