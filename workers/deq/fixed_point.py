"""``DEQFixedPoint``: a module whose output is the fixed point ``z* = func(z*, x)``.

Forward: a solver (no autograd) finds ``z*``. Backward, two choices:

- ``"implicit"`` (default): re-attach ``z = func(z*, x)`` once and replace its incoming gradient
  ``v`` by the solution ``g`` of the adjoint fixed point ``g = (df/dz)^T g + v`` (solved with the
  same solver, vector-Jacobian products from one retained graph). Memory is one application of
  ``func``, whatever the number of forward iterations.
- ``"phantom"``: ``k`` damped steps ``z <- (1 - tau) z + tau func(z, x)`` with autograd from
  ``z*`` (TorchDEQ's phantom gradient); memory grows with ``k`` only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError

from .solvers import SolverStats, _check, solve

BACKWARDS = ("implicit", "phantom")


@dataclass(frozen=True)
class SolverConfig:
    """Solver settings as one value (rejects contradictory options at construction)."""

    method: str = "anderson"
    tol: float = 1e-3
    max_iter: int = 30
    eval_max_iter: int | None = None
    m: int = 5
    lam: float = 1e-4
    beta: float = 1.0
    damping: float = 0.0
    #: iterations between the solver's stop tests (its only host synchronisation; see ``solve``)
    check_every: int = 1

    def __post_init__(self) -> None:
        _check(self.method, self.tol, self.max_iter, self.m, self.lam, self.beta, self.damping)
        if self.eval_max_iter is not None and self.eval_max_iter < 1:
            raise ConfigError(f"eval_max_iter must be >= 1 or None, got {self.eval_max_iter!r}")
        if self.check_every < 1:
            raise ConfigError(f"check_every must be >= 1, got {self.check_every!r}")

    def kwargs(self, max_iter: int) -> dict:
        return dict(
            method=self.method,
            tol=self.tol,
            max_iter=max_iter,
            m=self.m,
            lam=self.lam,
            beta=self.beta,
            damping=self.damping,
            check_every=self.check_every,
        )


class DEQFixedPoint(nn.Module):
    """Deep-equilibrium wrapper around ``func(z, x) -> z``.

    ``init(x)`` builds the cold start (default ``zeros_like(x)``); ``forward(x, z0)`` accepts a
    warm start. ``max_iter`` applies in training, ``eval_max_iter`` (default ``max_iter``) in eval.
    ``check_every``: iterations between the solver's stop tests, its only host synchronisation
    (a GPU run may raise it; results and statistics do not change, see :func:`solve`).
    """

    def __init__(
        self,
        func: Callable[[Tensor, Tensor], Tensor],
        *,
        init: Callable[[Tensor], Tensor] | None = None,
        method: str = "anderson",
        tol: float = 1e-3,
        max_iter: int = 30,
        eval_max_iter: int | None = None,
        m: int = 5,
        lam: float = 1e-4,
        beta: float = 1.0,
        damping: float = 0.0,
        backward: str = "implicit",
        backward_tol: float | None = None,
        backward_max_iter: int | None = None,
        phantom_steps: int = 5,
        phantom_tau: float = 0.6,
        check_every: int = 1,
    ) -> None:
        super().__init__()
        if backward not in BACKWARDS:
            raise ConfigError(f"unknown backward {backward!r}; use one of {BACKWARDS!r}")
        if phantom_steps < 1 or not 0 < phantom_tau <= 1:
            raise ConfigError(
                f"phantom_steps must be >= 1 and phantom_tau in (0, 1], got "
                f"{phantom_steps!r}, {phantom_tau!r}"
            )
        self.func = func
        self.init = init
        self.cfg = SolverConfig(
            method, tol, max_iter, eval_max_iter, m, lam, beta, damping, check_every
        )
        self.backward_mode = backward
        self.backward_tol = tol if backward_tol is None else backward_tol
        self.backward_max_iter = max_iter if backward_max_iter is None else backward_max_iter
        self.phantom_steps = phantom_steps
        self.phantom_tau = phantom_tau
        self.last_backward_stats: SolverStats | None = None
        # differentiable relative residual of the last training forward (for a fixed-point
        # regulariser that keeps the map contractive); None until a forward with autograd
        self.last_train_residual: Tensor | None = None

    def forward(
        self, x: Tensor, z0: Tensor | None = None, max_iter: int | None = None
    ) -> tuple[Tensor, SolverStats]:
        """Return ``(z*, stats)``; ``max_iter`` overrides the configured cap for this call."""
        if z0 is None:
            z0 = self.init(x) if self.init is not None else torch.zeros_like(x)
        cap = max_iter or (
            self.cfg.max_iter if self.training else (self.cfg.eval_max_iter or self.cfg.max_iter)
        )
        z_star, stats = solve(lambda z: self.func(z, x), z0.detach(), **self.cfg.kwargs(cap))
        if not torch.is_grad_enabled():
            return z_star, stats
        if self.backward_mode == "phantom":
            z = z_star
            for _ in range(self.phantom_steps):
                fz = self.func(z, x)
                self.last_train_residual = (fz - z).flatten(1).norm(dim=1) / (
                    fz.flatten(1).norm(dim=1) + 1e-12
                )
                z = (1 - self.phantom_tau) * z + self.phantom_tau * fz
            return z, stats
        z = self.func(z_star, x)  # one re-attached step: gradients to params and x
        self.last_train_residual = (z - z_star).flatten(1).norm(dim=1) / (
            z.flatten(1).norm(dim=1) + 1e-12
        )
        if z.requires_grad:
            z_in = z_star.clone().requires_grad_()
            f_in = self.func(z_in, x)

            def hook(grad: Tensor) -> Tensor:
                def adjoint(g: Tensor) -> Tensor:
                    vjp = torch.autograd.grad(f_in, z_in, g, retain_graph=True)[0]
                    return vjp + grad

                with torch.enable_grad():
                    g, bstats = solve(
                        adjoint,
                        grad,
                        method=self.cfg.method,
                        tol=self.backward_tol,
                        max_iter=self.backward_max_iter,
                        m=self.cfg.m,
                        lam=self.cfg.lam,
                        beta=self.cfg.beta,
                        damping=self.cfg.damping,
                        check_every=self.cfg.check_every,
                    )
                self.last_backward_stats = bstats
                return g

            z.register_hook(hook)
        return z, stats
