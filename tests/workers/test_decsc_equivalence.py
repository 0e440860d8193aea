"""Issue 22: the DECSC map without structural zeros computes the same model as the old folded one.

The old implementation (band axis folded into channels, one 2D convolution with a block-banded
(Cout*B, Cin*B, 3, 3) kernel) lives on only here, as the reference: ``_conv3d_folded``,
``_old_map_forward`` and ``_old_solve`` are verbatim copies of the code before the change. The
new map (:func:`workers.denoise.decsc.conv3d_banded`, true 3D convolutions) and the new batched
solver must reproduce it on real data with both shipped weight files (fp32, max abs difference
<= 1e-4), one map evaluation and the full forward (solver included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.noise import add_noise
from workers.denoise.api import load_denoiser
from workers.denoise.decsc import DECSC, DECSCMap, conv3d_banded, estimate_sigma, soft_threshold
from workers.deq import SolverStats

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parents[1] / "data"
TOL = 1e-4


# ---------------------------------------------------------------- the old code (reference only)
def _conv3d_folded(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The old ``conv3d_folded`` (verbatim): one 2D conv with a block-banded folded kernel."""
    n, cin, b, h, w = x.shape
    cout = weight.shape[0]
    folded: Tensor | None = None
    for d in (-1, 0, 1):  # band offset: output band j reads input band j + d
        shift = torch.diag(torch.ones(b - abs(d), dtype=weight.dtype, device=weight.device), d)
        term = torch.einsum("oikl,bc->obickl", weight[:, :, d + 1], shift)
        folded = term if folded is None else folded + term
    assert folded is not None
    folded = folded.reshape(cout * b, cin * b, weight.shape[-2], weight.shape[-1])
    fb = None if bias is None else bias.repeat_interleave(b)
    out = F.conv2d(x.reshape(n, cin * b, h, w), folded, fb, padding=weight.shape[-1] // 2)
    return out.reshape(n, cout, b, h, w)


def _old_dem(dem: torch.nn.Module, u: Tensor) -> Tensor:
    d = _conv3d_folded(u, dem.diff.kernel(), dem.diff.bias)
    gate = torch.einsum("oc,ncbhw->nobhw", dem.gate_w, d) + dem.gate_b[None, :, None, None, None]
    return u + torch.sigmoid(gate) * d


def _old_map_forward(mp: DECSCMap, z: Tensor, x: Tensor) -> Tensor:
    """The old ``DECSCMap.forward`` (verbatim but for ``self`` -> ``mp`` and the folded conv)."""
    b = mp.cfg.bands
    y, s = x[:, :b], x[:, b:]
    h, w = y.shape[-2:]
    a, u = mp.unpack(z, h, w)
    r = y - mp.dec_c(a) - _conv3d_folded(u, mp.dec_u.weight)[:, 0]
    a_new = mp.transformer(a + mp.enc_c(r))
    t_c = (
        F.softplus(mp.theta_c)[None, :, None, None] * s.mean(1, keepdim=True)
        + 1e-2 * F.softplus(mp.eps_c)[None, :, None, None]
    )
    a_new = soft_threshold(a_new, t_c)
    u_new = _old_dem(mp.dem, u + _conv3d_folded(r[:, None], mp.enc_u.weight))
    t_u = (
        F.softplus(mp.theta_u)[None, :, None, None, None] * s[:, None]
        + 1e-2 * F.softplus(mp.eps_u)[None, :, None, None, None]
    )
    u_new = soft_threshold(u_new, t_u)
    return torch.cat([a_new.flatten(1), u_new.flatten(1)], dim=1)


def _old_synth(mp: DECSCMap, z: Tensor, h: int, w: int) -> Tensor:
    a, u = mp.unpack(z, h, w)
    return mp.dec_c(a) + _conv3d_folded(u, mp.dec_u.weight)[:, 0]


def _old_solve(
    f,
    z0: Tensor,
    *,
    tol: float,
    max_iter: int,
    m: int,
    lam: float = 1e-4,
    beta: float = 1.0,
    damping: float = 0.0,
) -> tuple[Tensor, SolverStats]:
    """The old Anderson branch of ``workers.deq.solvers.solve`` (verbatim, Picard branch dropped)."""
    eps = 1e-12
    with torch.no_grad():
        shape = z0.shape
        n = shape[0]
        z = z0.reshape(n, -1).clone()
        dev, dt = z.device, z.dtype
        iterations = torch.full((n,), max_iter, dtype=torch.int64, device=dev)
        converged = torch.zeros(n, dtype=torch.bool, device=dev)
        best_res = torch.full((n,), float("inf"), dtype=dt, device=dev)
        best = z.clone()
        fb_damp = max(damping, 0.5)
        d = z.shape[1]
        X = torch.zeros(n, m, d, dtype=dt, device=dev)
        Fh = torch.zeros(n, m, d, dtype=dt, device=dev)
        for k in range(max_iter):
            fz = f(z.reshape(shape)).reshape(n, -1)
            res = (fz - z).norm(dim=1) / (fz.norm(dim=1) + eps)
            res = torch.where(torch.isfinite(res), res, torch.full_like(res, float("inf")))
            better = (res < best_res) & ~converged
            best = torch.where(better[:, None], fz, best)
            best_res = torch.where(better, res, best_res)
            newly = (res <= tol) & ~converged
            iterations = torch.where(newly, torch.full_like(iterations, k + 1), iterations)
            converged = converged | newly
            if bool(converged.all()) or k == max_iter - 1:
                break
            X[:, k % m] = z
            Fh[:, k % m] = fz
            h = min(k + 1, m)
            G = Fh[:, :h] - X[:, :h]
            gram = torch.bmm(G, G.transpose(1, 2))
            scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(eps)
            H = torch.zeros(n, h + 1, h + 1, dtype=dt, device=dev)
            H[:, 0, 1:] = 1
            H[:, 1:, 0] = 1
            H[:, 1:, 1:] = gram + lam * scale[:, None, None] * torch.eye(h, dtype=dt, device=dev)
            rhs = torch.zeros(n, h + 1, 1, dtype=dt, device=dev)
            rhs[:, 0] = 1
            sol, info = torch.linalg.solve_ex(H, rhs)
            alpha = sol[:, 1:, 0]
            ok = (info == 0) & torch.isfinite(alpha).all(dim=1)
            alpha = torch.where(ok[:, None], alpha, torch.zeros_like(alpha))
            mixed_f = torch.bmm(alpha[:, None], Fh[:, :h])[:, 0]
            mixed_x = torch.bmm(alpha[:, None], X[:, :h])[:, 0]
            anderson = beta * mixed_f + (1 - beta) * mixed_x
            fallback = (1 - fb_damp) * fz + fb_damp * z
            z = torch.where(ok[:, None], anderson, fallback)
        return best.reshape(shape), SolverStats(
            iterations=iterations, residual=best_res, converged=converged
        )


def _old_decsc_forward(model: DECSC, y: Tensor, max_iter: int) -> tuple[Tensor, SolverStats]:
    """The old ``DECSC.forward`` in eval mode (cold start), with the old map, synth and solver."""
    n, b, h, w = y.shape
    ws = model.cfg.window
    ph, pw = (-h) % ws, (-w) % ws
    sigma = estimate_sigma(y)
    if ph or pw:
        y = F.pad(y, (0, pw, 0, ph), mode="reflect" if (ph < h and pw < w) else "replicate")
    x = torch.cat([y, sigma[:, :, None, None].expand(n, b, *y.shape[-2:]).to(y.dtype)], dim=1)
    z0 = model._init(x)
    d = model.deq.cfg
    z, st = _old_solve(
        lambda z: _old_map_forward(model.map, z, x),
        z0,
        tol=d.tol,
        max_iter=max_iter,
        m=d.m,
        lam=d.lam,
        beta=d.beta,
        damping=d.damping,
    )
    return _old_synth(model.map, z, *y.shape[-2:])[..., :h, :w], st


# ---------------------------------------------------------------- real data
def _cave() -> np.ndarray:
    with np.load(DATA / "decsc" / "cave_balloons_48x48x31.npz") as d:
        return (d["cube"].astype(np.float32) / float(d["full_scale"])).clip(0, 1)


def _jasper31() -> np.ndarray:
    """Bands 60-90 of the Jasper Ridge crop (real AVIRIS digital numbers scaled to [0, 1])."""
    with np.load(DATA / "denoise_eval" / "crops.npz") as d:
        c = d["jasper_dn"].astype(np.float32)
        lo, hi = float(d["jasper_full_min"]), float(d["jasper_full_max"])
    return ((c - lo) / (hi - lo)).clip(0, 1)[60:91]


def _windows() -> Tensor:
    """Two noisy real 31-band windows (N=2): a CAVE crop and a Jasper Ridge crop, 32x32."""
    rng = np.random.default_rng(0)
    a = add_noise(_cave()[:, 8:40, 8:40], "gauss30", rng)
    b = add_noise(_jasper31(), "band[0,55]", rng)
    return torch.from_numpy(np.stack([a, b]).astype(np.float32))


@pytest.fixture(scope="module", params=["shipped", "full"])
def model(request: pytest.FixtureRequest) -> DECSC:
    return load_denoiser(arch=request.param)  # type: ignore[return-value]


def _map_input(model: DECSC, y: Tensor) -> Tensor:
    n, b = y.shape[:2]
    sigma = estimate_sigma(y)
    return torch.cat([y, sigma[:, :, None, None].expand(n, b, *y.shape[-2:])], dim=1)


def test_conv3d_banded_equals_conv3d_and_folded() -> None:
    g = torch.Generator().manual_seed(0)
    for cin, cout in [(1, 4), (4, 1), (4, 4), (3, 5), (16, 1), (1, 1)]:
        x = torch.randn(2, cin, 31, 9, 11, generator=g, dtype=torch.float64)
        w = torch.randn(cout, cin, 3, 3, 3, generator=g, dtype=torch.float64)
        b = torch.randn(cout, generator=g, dtype=torch.float64)
        new = conv3d_banded(x, w, b)
        torch.testing.assert_close(new, F.conv3d(x, w, b, padding=1))
        torch.testing.assert_close(new, _conv3d_folded(x, w, b))


@torch.no_grad()
def test_map_equals_old_folded_map_on_shipped_weights(model: DECSC) -> None:
    """One map evaluation at realistic codes (after 0, 1 and 4 steps) on real noisy windows."""
    y = _windows()
    x = _map_input(model, y)
    z = model._init(x)
    for step in range(5):
        old = _old_map_forward(model.map, z, x)
        new = model.map(z, x)
        assert new.shape == old.shape and new.dtype == torch.float32
        diff = (new - old).abs().max().item()
        assert diff <= TOL, (step, diff)
        if step in (0, 1, 4):
            assert old.abs().max() > 1e-3  # the codes are not trivially zero
        z = old
    h, w = y.shape[-2:]
    assert (model.map.synth(z, h, w) - _old_synth(model.map, z, h, w)).abs().max().item() <= TOL


@torch.no_grad()
def test_full_forward_equals_old_forward(model: DECSC) -> None:
    """DECSC end to end (padding, sigma, Anderson solver, synthesis) against the old code path;
    per-sample solver statistics keep their meaning."""
    y = _windows()[:, :, :30, :27]  # not a multiple of the attention window: padding path too
    cap = model.deq.cfg.eval_max_iter
    out_old, st_old = _old_decsc_forward(model, y, cap)
    out_new, st_new = model(y)
    assert out_new.shape == y.shape
    assert (out_new - out_old).abs().max().item() <= TOL
    assert torch.equal(st_new.iterations, st_old.iterations)
    assert torch.equal(st_new.converged, st_old.converged)
    torch.testing.assert_close(st_new.residual, st_old.residual, rtol=1e-3, atol=1e-6)
