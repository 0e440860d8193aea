"""Issue 22: the batched Anderson solver (ring-buffer history, incremental Gram row, no Python loop
over samples, at most one host synchronisation per iteration) keeps the old solver's results and
per-sample statistics."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import ConfigError
from tests.workers.test_decsc_equivalence import _old_solve
from workers.deq import solve

torch.set_num_threads(1)


def _problem(n: int = 6, d: int = 40, seed: int = 0, dtype=torch.float64):
    """Per-sample contractions with different rates (some samples converge much later)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=dtype)
    W = W / torch.linalg.matrix_norm(W, ord=2)
    rho = torch.linspace(0.3, 0.97, n, dtype=dtype)[:, None]
    b = torch.randn(n, d, generator=g, dtype=dtype)
    return lambda z: torch.tanh(rho * (z @ W.T) + b), (n, d)


@pytest.mark.parametrize("beta", [1.0, 0.7])
@pytest.mark.parametrize("m", [1, 3, 5])
def test_matches_reference_solver_per_sample(beta: float, m: int) -> None:
    f, shape = _problem()
    z0 = torch.zeros(shape, dtype=torch.float64)
    for tol, cap in ((1e-9, 200), (1e-30, 9)):  # converging, and hitting the cap
        z_ref, st_ref = _old_solve(f, z0, tol=tol, max_iter=cap, m=m, beta=beta)
        z, st = solve(f, z0, tol=tol, max_iter=cap, m=m, beta=beta)
        torch.testing.assert_close(z, z_ref, rtol=1e-9, atol=1e-11)
        assert torch.equal(st.iterations, st_ref.iterations)
        assert torch.equal(st.converged, st_ref.converged)
        torch.testing.assert_close(st.residual, st_ref.residual, rtol=1e-6, atol=1e-14)
        assert st.iterations.dtype == torch.int64 and st.converged.dtype == torch.bool
    # the samples really stop on their own: different iteration counts in one batch
    _, st = solve(f, z0, tol=1e-9, max_iter=200, m=m, beta=beta)
    assert st.converged.all() and len(set(st.iterations.tolist())) > 2


def test_fallback_matches_reference_when_gram_is_singular() -> None:
    c = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    f = lambda z: c + 0 * z  # noqa: E731
    z0 = torch.full((2, 3), 5.0, dtype=torch.float64)
    z_ref, st_ref = _old_solve(f, z0, tol=1e-6, max_iter=60, m=5, lam=0.0)
    z, st = solve(f, z0, tol=1e-6, max_iter=60, m=5, lam=0.0)
    torch.testing.assert_close(z, z_ref)
    assert torch.equal(st.iterations, st_ref.iterations) and st.converged.all()


def test_non_finite_sample_does_not_touch_the_others() -> None:
    f0, shape = _problem(n=3)

    def f(z: torch.Tensor) -> torch.Tensor:
        out = f0(z)
        out[1] = float("nan")
        return out

    z, st = solve(f, torch.zeros(shape, dtype=torch.float64), tol=1e-9, max_iter=100)
    z_ok, st_ok = solve(f0, torch.zeros(shape, dtype=torch.float64), tol=1e-9, max_iter=100)
    assert not st.converged[1] and torch.isinf(st.residual[1])
    for i in (0, 2):
        torch.testing.assert_close(z[i], z_ok[i])
        assert st.iterations[i] == st_ok.iterations[i] and st.converged[i]


class _SyncCounter:
    """Counts host reads of tensor values (``bool()``, ``item()``, ``tolist()``) while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in ("__bool__", "item", "tolist"):
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, **k):
                self.count += 1
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_at_most_one_host_sync_per_check(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    f, shape = _problem()
    z0 = torch.zeros(shape, dtype=torch.float64)
    z1, st1 = solve(f, z0, method=method, tol=1e-30, max_iter=12)
    z3, st3 = solve(f, z0, method=method, tol=1e-30, max_iter=12, check_every=3)
    counter = _SyncCounter(monkeypatch)
    solve(f, z0, method=method, tol=1e-30, max_iter=12)
    every = counter.count
    counter.count = 0
    solve(f, z0, method=method, tol=1e-30, max_iter=12, check_every=3)
    every3 = counter.count
    counter.count = 0
    solve(f, z0, method=method, tol=1e-30, max_iter=12, check_every=100)
    never = counter.count
    monkeypatch.undo()
    assert every <= 11 and every3 <= 4 and never == 0, (every, every3, never)
    torch.testing.assert_close(z1, z3)
    assert torch.equal(st1.iterations, st3.iterations)


def test_check_every_keeps_results_and_stats_once_converged() -> None:
    f, shape = _problem()
    z0 = torch.zeros(shape, dtype=torch.float64)
    calls = {"n": 0}

    def counted(z: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return f(z)

    z1, st1 = solve(counted, z0, tol=1e-8, max_iter=200)
    n1, calls["n"] = calls["n"], 0
    z5, st5 = solve(counted, z0, tol=1e-8, max_iter=200, check_every=5)
    assert torch.equal(z1, z5)
    assert torch.equal(st1.iterations, st5.iterations) and torch.equal(st1.residual, st5.residual)
    assert n1 == int(st1.iterations.max()) and n1 <= calls["n"] < n1 + 5
    with pytest.raises(ConfigError, match="check_every must be >= 1"):
        solve(f, z0, check_every=0)
