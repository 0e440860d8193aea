"""DEQ core: solver convergence, Anderson vs Picard, implicit gradients, stats, warm start."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.errors import ConfigError
from workers.deq import DEQFixedPoint, SolverStats, solve

torch.set_num_threads(1)


def _contraction(n: int = 4, d: int = 20, rho: float = 0.9, seed: int = 0, dtype=torch.float64):
    """Affine-tanh contraction z -> tanh(W z + b) with spectral norm rho (< 1)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=dtype)
    W = rho * W / torch.linalg.matrix_norm(W, ord=2)
    b = torch.randn(n, d, generator=g, dtype=dtype)
    return lambda z: torch.tanh(z @ W.T + b), (n, d)


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_solver_converges_on_contraction(method: str) -> None:
    f, shape = _contraction()
    z, st = solve(f, torch.zeros(shape, dtype=torch.float64), method=method, tol=1e-8, max_iter=500)
    assert isinstance(st, SolverStats)
    assert st.converged.all()
    assert (st.residual <= 1e-8).all()
    assert torch.allclose(f(z), z, atol=1e-6)


def test_anderson_needs_fewer_iterations_than_picard() -> None:
    """Linear symmetric map with spectral radius 0.95: Picard converges slowly, Anderson fast."""
    g = torch.Generator().manual_seed(2)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64)
    S = A + A.T
    W = 0.95 * S / torch.linalg.eigvalsh(S).abs().max()
    b = torch.randn(4, 30, generator=g, dtype=torch.float64)
    f = lambda z: z @ W.T + b  # noqa: E731
    z0 = torch.zeros(4, 30, dtype=torch.float64)
    _, sa = solve(f, z0, method="anderson", tol=1e-6, max_iter=300, m=5)
    _, sp = solve(f, z0, method="picard", tol=1e-6, max_iter=300)
    assert sa.converged.all() and sp.converged.all()
    assert sa.iterations.float().mean() < 0.5 * sp.iterations.float().mean()


def test_stats_shapes_and_summary() -> None:
    f, (n, d) = _contraction(n=3, d=5)
    _, st = solve(f, torch.zeros(n, d, dtype=torch.float64), tol=1e-30, max_iter=7)
    assert st.iterations.shape == (n,) and st.iterations.dtype == torch.int64
    assert st.residual.shape == (n,) and st.converged.shape == (n,)
    assert not st.converged.any() and (st.iterations == 7).all()
    s = st.summary()
    assert set(s) >= {"iterations_max", "residual_max", "converged_fraction"}
    assert all(isinstance(v, float) for v in s.values())


def test_per_sample_stopping() -> None:
    """A sample starting at its fixed point stops after one evaluation; the others continue."""
    f, shape = _contraction()
    z_ref, _ = solve(f, torch.zeros(shape, dtype=torch.float64), tol=1e-12, max_iter=500)
    z0 = torch.zeros(shape, dtype=torch.float64)
    z0[0] = z_ref[0]
    _, st = solve(f, z0, tol=1e-8, max_iter=500)
    assert st.iterations[0] == 1
    assert (st.iterations[1:] > 1).all()


def test_warm_start_reduces_iterations() -> None:
    f, shape = _contraction(rho=0.95)
    z_cold, st_cold = solve(f, torch.zeros(shape, dtype=torch.float64), tol=1e-6, max_iter=300)
    near = z_cold + 1e-4 * torch.randn(
        shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    _, st_warm = solve(f, near, tol=1e-6, max_iter=300)
    assert st_warm.iterations.float().mean() < st_cold.iterations.float().mean()


def test_anderson_falls_back_when_gram_is_singular() -> None:
    """lam=0 with a constant map makes the Gram matrix singular: the fallback must still converge."""
    c = torch.ones(2, 3, dtype=torch.float64)
    z, st = solve(
        lambda z: c + 0 * z,
        torch.ones(2, 3, dtype=torch.float64) * 5,
        lam=0.0,
        tol=1e-6,
        max_iter=60,
    )
    assert st.converged.all() and torch.allclose(z, c)


@pytest.mark.parametrize(
    "kwargs, frag",
    [
        ({"method": "newton"}, "unknown solver method"),
        ({"tol": 0.0}, "tol must be > 0"),
        ({"max_iter": 0}, "max_iter must be >= 1"),
        ({"beta": 1.5}, "beta must be in"),
        ({"damping": 1.0}, "damping must be in"),
    ],
)
def test_bad_options_rejected(kwargs: dict, frag: str) -> None:
    f, shape = _contraction()
    with pytest.raises(ConfigError, match=frag):
        solve(f, torch.zeros(shape), **kwargs)


class _Layer(nn.Module):
    """f(z, x) = tanh(W z + U x + b), contractive for small W."""

    def __init__(self, d: int = 6, dx: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.W = nn.Parameter(0.3 * torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5)
        self.U = nn.Parameter(torch.randn(d, dx, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
        self.d = d

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def _grads(layer: _Layer, x: torch.Tensor, z: torch.Tensor) -> list[torch.Tensor]:
    loss = (z**2).sum() + z.sum()
    params = [layer.W, layer.U, layer.b, x]
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_implicit_gradient_matches_long_unrolled_reference(method: str) -> None:
    layer = _Layer()
    x = torch.randn(
        3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True
    )
    deq = DEQFixedPoint(
        layer,
        init=lambda x: torch.zeros(x.shape[0], layer.d, dtype=x.dtype),
        method=method,
        tol=1e-12,
        max_iter=200,
        backward_tol=1e-12,
    )
    z, st = deq(x)
    assert st.converged.all()
    g_deq = _grads(layer, x, z)
    assert deq.last_backward_stats is not None and deq.last_backward_stats.converged.all()
    zu = torch.zeros(3, layer.d, dtype=torch.float64)
    for _ in range(200):  # unrolled reference: backprop through every iteration
        zu = layer(zu, x)
    g_ref = _grads(layer, x, zu)
    for a, b in zip(g_deq, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_phantom_gradient_is_close_to_implicit() -> None:
    layer = _Layer()
    x = torch.randn(
        3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True
    )
    init = lambda x: torch.zeros(x.shape[0], layer.d, dtype=x.dtype)  # noqa: E731
    imp = DEQFixedPoint(layer, init=init, tol=1e-12, max_iter=200, backward_tol=1e-12)
    ph = DEQFixedPoint(
        layer,
        init=init,
        tol=1e-12,
        max_iter=200,
        backward="phantom",
        phantom_steps=30,
        phantom_tau=1.0,
    )
    gi = _grads(layer, x, imp(x)[0])
    gp = _grads(layer, x, ph(x)[0])
    for a, b in zip(gi, gp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_eval_max_iter_and_no_grad_path() -> None:
    layer = _Layer()
    x = torch.randn(2, 4, dtype=torch.float64)
    deq = DEQFixedPoint(
        layer,
        init=lambda x: torch.zeros(x.shape[0], layer.d, dtype=x.dtype),
        tol=1e-30,
        max_iter=3,
        eval_max_iter=9,
    )
    deq.train()
    with torch.no_grad():
        _, st = deq(x)
    assert (st.iterations == 3).all()
    deq.eval()
    with torch.no_grad():
        z, st = deq(x)
    assert (st.iterations == 9).all() and not z.requires_grad


def test_bad_backward_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown backward 'magic'"):
        DEQFixedPoint(_Layer(), backward="magic")
