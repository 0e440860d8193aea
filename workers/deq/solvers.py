"""Fixed-point solvers (Anderson acceleration, damped Picard) with per-sample statistics.

A solver finds ``z* = f(z*)`` for a batch ``z`` of shape ``(N, ...)``. Every sample stops on its
own relative residual ``||f(z) - z|| / ||f(z)||``; the loop ends when all samples converged or at
``max_iter``. The statistics are provenance: callers record them and flag non-converged samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.errors import ConfigError

METHODS = ("anderson", "picard")
_EPS = 1e-12


@dataclass
class SolverStats:
    """Per-sample solver statistics (tensors of length N)."""

    iterations: Tensor  # int64: f evaluations until the sample met tol (max_iter if it never did)
    residual: Tensor  # float: relative residual of the returned iterate
    converged: Tensor  # bool: residual <= tol

    def summary(self) -> dict[str, float]:
        """Python floats for provenance: worst and mean over the batch."""
        return {
            "iterations_max": float(self.iterations.max().item()),
            "iterations_mean": float(self.iterations.float().mean().item()),
            "residual_max": float(self.residual.max().item()),
            "residual_mean": float(self.residual.float().mean().item()),
            "converged_fraction": float(self.converged.float().mean().item()),
        }


def _check(
    method: str, tol: float, max_iter: int, m: int, lam: float, beta: float, damping: float
) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown solver method {method!r}; use one of {METHODS!r}")
    if not tol > 0:
        raise ConfigError(f"solver tol must be > 0, got {tol!r}")
    if max_iter < 1:
        raise ConfigError(f"solver max_iter must be >= 1, got {max_iter!r}")
    if m < 1:
        raise ConfigError(f"Anderson history m must be >= 1, got {m!r}")
    if lam < 0:
        raise ConfigError(f"Anderson regularisation lam must be >= 0, got {lam!r}")
    if not 0 < beta <= 1:
        raise ConfigError(f"Anderson mixing beta must be in (0, 1], got {beta!r}")
    if not 0 <= damping < 1:
        raise ConfigError(f"Picard damping must be in [0, 1), got {damping!r}")


@dataclass
class _Tracker:
    """Per-sample bookkeeping of the solve: the best ``f(z)`` so far, its residual, and when
    each sample met ``tol`` (converged samples are frozen, so later steps cannot change them)."""

    iterations: Tensor
    converged: Tensor
    best_res: Tensor
    best: Tensor
    inf: Tensor

    @classmethod
    def start(cls, z: Tensor, max_iter: int) -> _Tracker:
        """Fresh state for the flattened batch ``z``: nothing converged, no residual seen."""
        n, dev, dt = z.shape[0], z.device, z.dtype
        return cls(
            iterations=torch.full((n,), max_iter, dtype=torch.int64, device=dev),
            converged=torch.zeros(n, dtype=torch.bool, device=dev),
            best_res=torch.full((n,), float("inf"), dtype=dt, device=dev),
            best=z.clone(),
            inf=torch.full((), float("inf"), dtype=dt, device=dev),
        )

    def update(self, fz: Tensor, g: Tensor, k: int, tol: float) -> None:
        """Record step ``k``: relative residual of ``fz`` (non-finite counts as inf), keep it
        where it beats the best so far, and mark the samples that met ``tol`` now."""
        res = g.norm(dim=1) / (fz.norm(dim=1) + _EPS)
        res = torch.where(torch.isfinite(res), res, self.inf)
        better = (res < self.best_res) & ~self.converged
        torch.where(better[:, None], fz, self.best, out=self.best)
        self.best_res = torch.where(better, res, self.best_res)
        newly = (res <= tol) & ~self.converged
        self.iterations = torch.where(newly, k + 1, self.iterations)
        self.converged = self.converged | newly


@dataclass
class _AndersonBuffers:
    """Preallocated Anderson state: ring buffers of ``f(z_i)`` and ``g_i = f(z_i) - z_i``
    (``z_i = f(z_i) - g_i``, so no third buffer), the Gram matrix of the ``g_i``, two spare
    iterate buffers used in turn, and constants, so an iteration allocates little."""

    Fh: Tensor  # f(z_i), (n, m, d)
    Gh: Tensor  # g_i = f(z_i) - z_i, (n, m, d)
    gram: Tensor  # (n, m, m)
    zbuf: Tensor  # iterates, used in turn, (2, n, d)
    eye: Tensor
    ones: Tensor

    @classmethod
    def allocate(
        cls, n: int, d: int, m: int, dt: torch.dtype, dev: torch.device
    ) -> _AndersonBuffers:
        """Buffers for ``n`` samples of size ``d`` and history ``m``."""
        return cls(
            Fh=torch.empty(n, m, d, dtype=dt, device=dev),
            Gh=torch.empty(n, m, d, dtype=dt, device=dev),
            gram=torch.zeros(n, m, m, dtype=dt, device=dev),
            zbuf=torch.empty(2, n, d, dtype=dt, device=dev),
            eye=torch.eye(m, dtype=dt, device=dev),
            ones=torch.ones(n, m + 1, dtype=dt, device=dev),
        )


def _anderson_weights(
    buf: _AndersonBuffers, g: Tensor, s: int, h: int, lam: float
) -> tuple[Tensor, Tensor]:
    """Mixing weights ``alpha`` (n, h), summing to one, from the regularised Gram solve after
    writing the newest residual's Gram row; ``ok`` marks samples whose solve succeeded and is finite."""
    n, dt, dev = g.shape[0], g.dtype, g.device
    # only the newest row of the Gram matrix g_s . g_j: the older entries do not change.
    # A (1, d) x (d, h) product per sample: 4x faster on CPU than the (h, d) x (d, h) GEMM
    # of the whole matrix (and than the (h, d) x (d, 1) form). It rounds differently from
    # the whole-matrix GEMM; through the ill-conditioned fp32 solve that moves DECSC's
    # unconverged outputs by up to ~7e-5 (tests/workers/test_decsc_equivalence.py)
    row = torch.bmm(g[:, None], buf.Gh[:, :h].transpose(1, 2))[:, 0]
    buf.gram[:, s, :h] = row
    buf.gram[:, :h, s] = row
    gh = buf.gram[:, :h, :h]
    # scale the ridge with the Gram magnitude so lam is unit-free
    scale = gh.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(_EPS)
    # bordered system [[0, 1^T], [1, gram + ridge]] [nu; alpha] = [1; 0]
    ridge = gh + lam * scale[:, None, None] * buf.eye[:h, :h]
    ones = buf.ones
    H = torch.cat([ones[:, None, : h + 1], torch.cat([ones[:, :h, None], ridge], dim=2)], dim=1)
    H[:, 0, 0] = 0
    rhs = torch.zeros(n, h + 1, 1, dtype=dt, device=dev)
    rhs[:, 0] = 1
    sol, info = torch.linalg.solve_ex(H, rhs)
    alpha = sol[:, 1:, 0]  # (n, h), sums to one
    ok = (info == 0) & torch.isfinite(alpha).all(dim=1)
    return alpha, ok


def _anderson_step(
    buf: _AndersonBuffers,
    fz: Tensor,
    g: Tensor,
    k: int,
    m: int,
    lam: float,
    beta: float,
    fb_damp: float,
) -> Tensor:
    """Next Anderson iterate after step ``k`` (``g`` is already in the ring at slot ``k % m``);
    samples whose Gram solve failed take a damped Picard step. Returns a spare-buffer view."""
    s = k % m
    buf.Fh[:, s].copy_(fz)
    h = min(k + 1, m)
    alpha, ok = _anderson_weights(buf, g, s, h, lam)
    # next iterate z = sum_i cf_i f(z_i) - sum_i cg_i g_i, written into a spare buffer:
    # Anderson  cf = alpha, cg = (1 - beta) alpha   (sum alpha_i z_i = sum alpha_i (f(z_i) - g_i));
    # fallback  cf = e_s,   cg = fb_damp e_s        ((1 - fb) f(z) + fb z = f(z) - fb g)
    # (a non-finite f(z) makes a sample's iterates non-finite from then on either way)
    e_s = torch.zeros_like(alpha)
    e_s[:, s] = 1
    cf = torch.where(ok[:, None], alpha, e_s)
    z_next = buf.zbuf[k % 2]
    torch.bmm(cf[:, None], buf.Fh[:, :h], out=z_next[:, None])
    if beta != 1:
        cg = torch.where(ok[:, None], (1 - beta) * alpha, fb_damp * e_s)
        z_next.sub_(torch.bmm(cg[:, None], buf.Gh[:, :h])[:, 0])
    else:  # only the fallback samples mix in g_s
        z_next.addcmul_(g, torch.where(ok, 0.0, -fb_damp).to(g.dtype)[:, None])
    return z_next


def solve(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    method: str = "anderson",
    tol: float = 1e-3,
    max_iter: int = 30,
    m: int = 5,
    lam: float = 1e-4,
    beta: float = 1.0,
    damping: float = 0.0,
    check_every: int = 1,
) -> tuple[Tensor, SolverStats]:
    """Solve ``z = f(z)`` from ``z0`` (shape ``(N, ...)``); return ``(z*, stats)``.

    ``method="picard"``: ``z <- (1 - damping) f(z) + damping z``.
    ``method="anderson"``: Anderson acceleration with history ``m``, mixing ``beta`` and a
    Tikhonov-regularised (``lam``) Gram solve; where that solve is singular or non-finite for a
    sample, that sample takes a damped Picard step instead (damping at least 0.5).
    The returned iterate of each sample is ``f(z)`` at the step it met ``tol`` (frozen from then
    on) or, if it never did, the ``f(z)`` with the smallest residual seen. Runs without autograd.

    The whole batch is one set of tensor operations on ``z0``'s device: no Python loop over
    samples, and the only host synchronisation is the stop test (are all samples converged?),
    read every ``check_every`` iterations (default every iteration). A larger ``check_every``
    may spend up to ``check_every - 1`` extra evaluations of ``f`` once every sample has
    converged; the result and the statistics are the same (converged samples are frozen).

    Bookkeeping per iteration reads the history twice for a state of size d (one Gram row, one
    mix): it keeps ``f(z_i)`` and the residuals ``g_i = f(z_i) - z_i`` (``z_i = f(z_i) - g_i``:
    no third buffer, no per-iteration copy of stacked differences) in preallocated ring buffers,
    updates only the newest row of the Gram matrix, and writes iterates into two spare buffers.
    """
    _check(method, tol, max_iter, m, lam, beta, damping)
    if check_every < 1:
        raise ConfigError(f"solver check_every must be >= 1, got {check_every!r}")
    with torch.no_grad():
        shape = z0.shape
        n = shape[0]
        z = z0.reshape(n, -1)
        track = _Tracker.start(z, max_iter)
        fb_damp = max(damping, 0.5)
        anderson = method == "anderson"
        if anderson:
            buf = _AndersonBuffers.allocate(n, z.shape[1], m, z.dtype, z.device)
        else:
            g_buf = torch.empty_like(z)
        for k in range(max_iter):
            fz = f(z.reshape(shape)).reshape(n, -1)
            if anderson:
                g = buf.Gh[:, k % m]
                torch.sub(fz, z, out=g)
            else:
                g = torch.sub(fz, z, out=g_buf)
            track.update(fz, g, k, tol)
            if k == max_iter - 1 or ((k + 1) % check_every == 0 and bool(track.converged.all())):
                break
            if not anderson:
                z = fz if damping == 0 else torch.lerp(fz, z, damping)
                continue
            z = _anderson_step(buf, fz, g, k, m, lam, beta, fb_damp)
        out = track.best.reshape(shape)
        stats = SolverStats(
            iterations=track.iterations, residual=track.best_res, converged=track.converged
        )
    return out, stats
