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


def _check(method: str, tol: float, max_iter: int, m: int, lam: float, beta: float, damping: float) -> None:
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
) -> tuple[Tensor, SolverStats]:
    """Solve ``z = f(z)`` from ``z0`` (shape ``(N, ...)``); return ``(z*, stats)``.

    ``method="picard"``: ``z <- (1 - damping) f(z) + damping z``.
    ``method="anderson"``: Anderson acceleration with history ``m``, mixing ``beta`` and a
    Tikhonov-regularised (``lam``) Gram solve; where that solve is singular or non-finite for a
    sample, that sample takes a damped Picard step instead (damping at least 0.5).
    The returned iterate of each sample is ``f(z)`` at the step it met ``tol`` (frozen from then
    on) or, if it never did, the ``f(z)`` with the smallest residual seen. Runs without autograd.
    """
    _check(method, tol, max_iter, m, lam, beta, damping)
    with torch.no_grad():
        shape = z0.shape
        n = shape[0]
        flat = lambda t: t.reshape(n, -1)  # noqa: E731
        z = flat(z0).clone()
        dev, dt = z.device, z.dtype
        iterations = torch.full((n,), max_iter, dtype=torch.int64, device=dev)
        converged = torch.zeros(n, dtype=torch.bool, device=dev)
        best_res = torch.full((n,), float("inf"), dtype=dt, device=dev)
        best = z.clone()
        fb_damp = max(damping, 0.5)
        if method == "anderson":
            d = z.shape[1]
            X = torch.zeros(n, m, d, dtype=dt, device=dev)
            F = torch.zeros(n, m, d, dtype=dt, device=dev)
        for k in range(max_iter):
            fz = flat(f(z.reshape(shape)))
            res = (fz - z).norm(dim=1) / (fz.norm(dim=1) + _EPS)
            res = torch.where(torch.isfinite(res), res, torch.full_like(res, float("inf")))
            better = (res < best_res) & ~converged
            best = torch.where(better[:, None], fz, best)
            best_res = torch.where(better, res, best_res)
            newly = (res <= tol) & ~converged
            iterations = torch.where(newly, torch.full_like(iterations, k + 1), iterations)
            converged = converged | newly
            if bool(converged.all()) or k == max_iter - 1:
                break
            picard = (1 - damping) * fz + damping * z
            if method == "picard":
                z = picard
                continue
            X[:, k % m] = z
            F[:, k % m] = fz
            h = min(k + 1, m)
            G = F[:, :h] - X[:, :h]  # (n, h, d)
            gram = torch.bmm(G, G.transpose(1, 2))
            # scale the ridge with the Gram magnitude so lam is unit-free
            scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(_EPS)
            H = torch.zeros(n, h + 1, h + 1, dtype=dt, device=dev)
            H[:, 0, 1:] = 1
            H[:, 1:, 0] = 1
            H[:, 1:, 1:] = gram + lam * scale[:, None, None] * torch.eye(h, dtype=dt, device=dev)
            rhs = torch.zeros(n, h + 1, 1, dtype=dt, device=dev)
            rhs[:, 0] = 1
            sol, info = torch.linalg.solve_ex(H, rhs)
            alpha = sol[:, 1:, 0]  # (n, h), sums to one
            ok = (info == 0) & torch.isfinite(alpha).all(dim=1)
            alpha = torch.where(ok[:, None], alpha, torch.zeros_like(alpha))
            mixed_f = torch.bmm(alpha[:, None], F[:, :h])[:, 0]
            mixed_x = torch.bmm(alpha[:, None], X[:, :h])[:, 0]
            anderson = beta * mixed_f + (1 - beta) * mixed_x
            fallback = (1 - fb_damp) * fz + fb_damp * z
            z = torch.where(ok[:, None], anderson, fallback)
        out = best.reshape(shape)
        stats = SolverStats(iterations=iterations, residual=best_res, converged=converged)
    return out, stats
