"""DEQ-Unmix: a deep-equilibrium unmixer (after "A Deep Equilibrium Network for Hyperspectral
Unmixing", arXiv 2604.11279), pure torch.

Linear mixing ``Y = E·A + N`` with ``A >= 0`` and columns summing to one, or (``scaled=True``) the
scaled linear model ``Y = s·E·A + N`` with a per-pixel brightness ``s > 0`` (illumination,
topography, shadow: the abundances stay on the simplex, ``s`` absorbs the pixel's brightness).
The abundances are the fixed point of a learned projected-gradient map

    A ← Π_Δ(A − G_θ(A, Y, E)),   G_θ = η·Eᵀ(EA − Y) + c_θ([A, η·Eᵀ(EA − Y), η·EᵀY])

(scaled: ``Eᵀ(EA − Y/s)``, ``s = ⟨EA, Y⟩/‖EA‖²`` the least-squares brightness of the current
mixture, recomputed in every application of the map and clamped to ``[1/SCALE_LIMIT,
SCALE_LIMIT]``), where ``η = 1/λ_max(EᵀE)`` (the step of classical projected gradient for this problem), ``c_θ``
is a small spectral-spatial conv net over the abundance maps (3×3 spatial context) whose output
layer starts at zero, so that the untrained map is exactly projected gradient (whose fixed point
is the FCLS solution), and ``Π_Δ`` is the sorting-based Euclidean projection onto the simplex.
The fixed point is found by the shared DEQ core (Anderson acceleration, implicit backward), so
training memory does not grow with the number of solver iterations.

Endmembers ``E`` (L×P) are learnable parameters, started from the blind estimate of
:func:`workers.unmix.fit.init_endmembers` and kept non-negative (:meth:`DEQUnmix.project_`).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError
from workers.deq import DEQFixedPoint, SolverStats


def simplex_project(v: Tensor, dim: int = 1) -> Tensor:
    """Euclidean projection of every vector along ``dim`` onto the probability simplex.

    Sorting-based (Held et al. 1974; Duchi et al. 2008): ``max(v − θ, 0)`` with the threshold
    ``θ`` from the sorted cumulative sums. Differentiable almost everywhere.
    """
    x = v.movedim(dim, -1)
    p = x.shape[-1]
    u, _ = torch.sort(x, dim=-1, descending=True)
    css = torch.cumsum(u, dim=-1) - 1.0
    k = torch.arange(1, p + 1, device=v.device, dtype=v.dtype)
    cond = (u - css / k) > 0
    rho = cond.sum(dim=-1, keepdim=True).clamp_min(1)
    theta = torch.gather(css, -1, rho - 1) / rho.to(v.dtype)
    return torch.clamp(x - theta, min=0.0).movedim(-1, dim)


class CorrectionNet(nn.Module):
    """``c_θ``: 3P channels [A, η·R, η·EᵀY] → P channels; one 3×3 conv, one 1×1 conv.

    Replicate padding so that tile edges and scene edges see plausible context. The last layer
    starts at zero: the untrained DEQ is exactly projected gradient (FCLS).
    """

    def __init__(self, p: int, hidden: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3 * p, hidden, 3, padding=1, padding_mode="replicate")
        self.conv2 = nn.Conv2d(hidden, hidden, 1)
        self.out = nn.Conv2d(hidden, p, 1)
        nn.init.zeros_(self.out.weight)
        assert self.out.bias is not None
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.out(h)


#: the per-pixel brightness of the scaled mixing model is clamped to [1/SCALE_LIMIT, SCALE_LIMIT]
#: (a factor 20 either way covers deep shadow and bright slopes; beyond it the pixel is not a
#: mixture of these endmembers)
SCALE_LIMIT = 20.0

#: receptive field of one application of the map, pixels each side
STEP_RADIUS = 1

#: the map reads per-call state set by ``_prepare`` (G, η, the maps' shape); a tile engine's threads
#: share one module per process, so forward passes take turns
_FORWARD_LOCK = threading.RLock()


class DEQUnmix(nn.Module):
    """The DEQ unmixer of one scene: endmembers ``E`` (L×P) + correction net + DEQ solver.

    ``forward(Y, band_mask=None)`` takes ``Y`` of shape ``(N, L, H, W)`` and returns the
    abundances ``(N, P, H, W)`` (each pixel on the simplex) and the solver statistics.
    ``band_mask`` (bool, length L) restricts the data term to a subset of bands: used in training
    for band-split self-supervision (fit on some bands, score the others). ``scaled`` selects the
    mixing model: ``Y = E·A`` (False) or ``Y = s·E·A`` with a per-pixel brightness ``s`` (True).
    """

    def __init__(
        self,
        endmembers: Tensor,
        *,
        hidden: int = 32,
        method: str = "anderson",
        tol: float = 1e-4,
        max_iter: int = 40,
        eval_max_iter: int | None = 100,
        backward: str = "implicit",
        backward_max_iter: int | None = 40,
        m: int = 3,
        scaled: bool = False,
    ) -> None:
        super().__init__()
        self.scaled = bool(scaled)
        if endmembers.ndim != 2 or endmembers.shape[1] < 2:
            raise ConfigError(
                f"endmembers must be L×P with P >= 2, got shape {tuple(endmembers.shape)!r}"
            )
        self.E = nn.Parameter(
            endmembers.detach().to(torch.float32).clamp_min(0.0).contiguous().clone()
        )
        self.p = int(endmembers.shape[1])
        self.hidden = hidden
        self.net = CorrectionNet(self.p, hidden)
        self.deq = DEQFixedPoint(
            self._map,
            init=None,
            method=method,
            tol=tol,
            max_iter=max_iter,
            eval_max_iter=eval_max_iter,
            backward=backward,
            backward_max_iter=backward_max_iter,
            m=m,
        )
        self._G: Tensor | None = None
        self._eta: Tensor | None = None
        self._nhw: tuple[int, int, int] = (0, 0, 0)

    # ------------------------------------------------------------------ map
    # The solver sees one sample per pixel (state (N·H·W, P)): Anderson mixing, the stopping test
    # and the statistics are per pixel, while the map itself couples neighbours through the conv
    # net. Per-tile Anderson (one mixing for thousands of pixels) stalls on ill-conditioned E.
    def _to_maps(self, z: Tensor) -> Tensor:
        n, h, w = self._nhw
        return z.reshape(n, h, w, self.p).permute(0, 3, 1, 2)

    def _to_pixels(self, A: Tensor) -> Tensor:
        return A.permute(0, 2, 3, 1).reshape(-1, self.p)

    def _map_maps(self, A: Tensor, x: Tensor) -> Tensor:
        """One application of the fixed-point map on maps; ``x`` = ``η·EᵀY`` (N, P, H, W)."""
        assert self._G is not None and self._eta is not None
        GA = torch.einsum("pq,nqhw->nphw", self._eta * self._G, A)  # η·EᵀEA
        if self.scaled:  # η·Eᵀ(EA − Y/s), s the least-squares brightness of the mixture EA
            R = GA - x / self._brightness(A, x, GA)
        else:
            R = GA - x  # η·Eᵀ(EA − Y)
        step = R + self.net(torch.cat([A, R, x], dim=1))
        return simplex_project(A - step, dim=1)

    @staticmethod
    def _brightness(A: Tensor, x: Tensor, GA: Tensor) -> Tensor:
        """``s = ⟨EA, Y⟩/‖EA‖²`` per pixel ``(N, 1, H, W)`` from ``x = η·EᵀY`` and ``GA = η·EᵀEA``
        (η cancels), clamped to ``[1/SCALE_LIMIT, SCALE_LIMIT]``."""
        num = (A * x).sum(dim=1, keepdim=True)
        den = (A * GA).sum(dim=1, keepdim=True).clamp_min(1e-12)
        return (num / den).clamp(1.0 / SCALE_LIMIT, SCALE_LIMIT)

    def _map(self, z: Tensor, x: Tensor) -> Tensor:
        return self._to_pixels(self._map_maps(self._to_maps(z), x))

    def _prepare(self, Y: Tensor, band_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """``x = η·EᵀY`` and the warm start (projected unconstrained least squares), as maps."""
        E = self.E if band_mask is None else self.E[band_mask]
        Yb = Y if band_mask is None else Y[:, band_mask]
        G = E.T @ E
        # the simplex projection ignores steps along 1 (Π(v + c·1) = Π(v)), so the step only has
        # to be stable on the tangent space {d: 1ᵀd = 0}: η = 1/λ_max(P_T G P_T), often far larger
        # than 1/λ_max(G) because correlated positive spectra put G's top eigenvector near 1.
        PT = torch.eye(self.p, dtype=G.dtype, device=G.device) - 1.0 / self.p
        eta = 1.0 / torch.linalg.eigvalsh(PT @ G @ PT)[-1].clamp_min(1e-12)
        self._G, self._eta = G, eta
        self._nhw = (int(Y.shape[0]), int(Y.shape[2]), int(Y.shape[3]))
        x = eta * torch.einsum("lp,nlhw->nphw", E, Yb)
        ridge = 1e-6 * torch.trace(G) / self.p
        Ginv = torch.linalg.inv(G + ridge * torch.eye(self.p, dtype=G.dtype, device=G.device))
        a = torch.einsum("pq,nqhw->nphw", Ginv / eta, x).detach()  # unconstrained least squares
        if self.scaled:  # the brightness is free: start from the least-squares mixture's shares
            a = a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return x, simplex_project(a, dim=1)

    def forward(
        self, Y: Tensor, band_mask: Tensor | None = None, max_iter: int | None = None
    ) -> tuple[Tensor, SolverStats]:
        """Abundances ``(N, P, H, W)`` and per-pixel solver statistics (length N·H·W).

        Thread-safe: concurrent calls on one module run one after the other."""
        with _FORWARD_LOCK:
            x, A0 = self._prepare(Y, band_mask)
            z, stats = self.deq(x, self._to_pixels(A0), max_iter=max_iter)
            return self._to_maps(z), stats

    def scale(self, A: Tensor, Y: Tensor, band_mask: Tensor | None = None) -> Tensor:
        """The per-pixel brightness ``s`` of abundances ``A`` for the cube ``Y`` on the
        ``band_mask`` bands, ``(N, 1, H, W)``: ``⟨EA, Y⟩/‖EA‖²`` clamped (scaled model), ones
        (linear model)."""
        if not self.scaled:
            return torch.ones_like(A[:, :1])
        E = self.E if band_mask is None else self.E[band_mask]
        Yb = Y if band_mask is None else Y[:, band_mask]
        x = torch.einsum("lp,nlhw->nphw", E, Yb)
        GA = torch.einsum("pq,nqhw->nphw", E.T @ E, A)
        return self._brightness(A, x, GA)

    def reconstruct(self, A: Tensor, Y: Tensor | None = None) -> Tensor:
        """The modelled cube ``(N, L, H, W)``: ``E·A``, or ``s·E·A`` with the brightness ``s`` of
        ``Y`` (scaled model, which needs ``Y``)."""
        EA = torch.einsum("lp,nphw->nlhw", self.E, A)
        if not self.scaled:
            return EA
        if Y is None:
            raise ConfigError(
                "the scaled mixing model reconstructs s·E·A: pass the observed cube Y for s"
            )
        return self.scale(A, Y) * EA

    @torch.no_grad()
    def project_(self) -> None:
        """Keep endmembers non-negative (called after every optimiser step)."""
        self.E.clamp_(min=0.0)

    def config(self) -> dict[str, Any]:
        c = self.deq.cfg
        return {
            "hidden": self.hidden,
            "method": c.method,
            "tol": c.tol,
            "max_iter": c.max_iter,
            "eval_max_iter": c.eval_max_iter,
            "m": c.m,
            "backward": self.deq.backward_mode,
            "backward_max_iter": self.deq.backward_max_iter,
            "scaled": self.scaled,
        }


class UnrolledUnmix(nn.Module):
    """Baseline for the memory claim: the same map unrolled ``depth`` times with autograd
    through every layer (SNMF-Net-style unrolled projected-gradient network, weights shared)."""

    def __init__(self, model: DEQUnmix, depth: int) -> None:
        super().__init__()
        self.model = model
        self.depth = depth

    def forward(self, Y: Tensor) -> Tensor:
        x, A = self.model._prepare(Y, None)
        for _ in range(self.depth):
            A = self.model._map_maps(A, x)
        return A
