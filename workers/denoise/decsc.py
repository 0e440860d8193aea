"""DECSC: deep-equilibrium convolutional sparse coding for HSI denoising (arXiv 2508.15553).

Model ``Y = C + U + N`` on a spectral window of ``bands`` bands:

- ``C = D_c * a``: a *shared* 2D convolutional sparse code ``a`` (K feature maps shared by all
  bands, per-band synthesis ``D_c``: conv2d K -> bands), refined by a Swin-style transformer
  (window + shifted-window self-attention) for nonlocal self-similarity.
- ``U = D_u * u``: an *unshared* 3D convolutional sparse code ``u`` (c feature volumes over
  band x y x x), refined by a detail-enhancement module: vanilla, central, horizontal, vertical
  and band difference 3D convolutions (merged into one kernel) and a gated attention map.

One proximal-gradient step of both branches is the fixed-point map over ``z = (a, u)``::

    r  = y - D_c a - D_u u
    a' = soft(T(a + E_c r),   theta_c * s_bar + eps_c)
    u' = soft(DEM(u + E_u r), theta_u * s_b   + eps_u)

with learned analysis (``E``) and synthesis (``D``) convolutions and learnable soft thresholds
scaled by a per-band noise level ``s_b`` estimated from the input itself (robust MAD of a
diagonal Haar detail), which makes the model noise-blind: band-dependent σ, correlated noise and
the mixture case need no σ from the caller. Output ``x = D_c a* + D_u u*``. No stochastic layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import ConfigError
from workers.deq import DEQFixedPoint, SolverStats


@dataclass(frozen=True)
class DECSCConfig:
    """Architecture sizes (defaults: the CPU-sized shipped model)."""

    bands: int = 31  # spectral window the weights are trained on
    shared_features: int = 32  # K: 2D sparse feature maps shared across bands
    unshared_features: int = 4  # c: 3D sparse feature volumes
    kernel: int = 3
    window: int = 8  # attention window (pixels)
    heads: int = 2
    mlp_ratio: float = 2.0

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if v is None or v <= 0:
                raise ConfigError(f"DECSC config {k} must be > 0, got {v!r}")
        if self.shared_features % self.heads:
            raise ConfigError(
                f"shared_features ({self.shared_features!r}) must be divisible by heads ({self.heads!r})"
            )
        if self.kernel % 2 == 0:
            raise ConfigError(f"kernel must be odd, got {self.kernel!r}")


def soft_threshold(x: Tensor, t: Tensor) -> Tensor:
    """Proximal operator of the l1 norm."""
    return torch.sign(x) * F.relu(x.abs() - t)


def estimate_sigma(y: Tensor, valid: Tensor | None = None) -> Tensor:
    """Per-band noise std of ``y`` (N, B, H, W): 1.4826 x median |diagonal Haar detail|.

    For i.i.d. noise the detail ``(y00 - y01 - y10 + y11) / 2`` has the noise's std while smooth
    signal cancels; the median ignores edges. ``valid`` (N, H, W) excludes nodata pixels.
    """
    d = 0.5 * (y[..., :-1, :-1] - y[..., :-1, 1:] - y[..., 1:, :-1] + y[..., 1:, 1:])
    d = d.abs()
    if valid is not None:
        v = valid[:, :-1, :-1] & valid[:, :-1, 1:] & valid[:, 1:, :-1] & valid[:, 1:, 1:]
        d = torch.where(v[:, None], d, torch.full_like(d, float("nan")))
    sig = 1.4826 * torch.nanmedian(d.flatten(2), dim=2).values
    return torch.nan_to_num(sig, nan=0.0)


class WindowAttention(nn.Module):
    """Swin-style block: (shifted) window multi-head self-attention + MLP, both residual."""

    def __init__(self, dim: int, window: int, heads: int, mlp_ratio: float, shift: bool) -> None:
        super().__init__()
        self.dim, self.ws, self.heads, self.shift = dim, window, heads, shift
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.rel_bias = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        coords = torch.stack(
            torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        ).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer(
            "rel_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False
        )
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        last = self.mlp[2]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def _mask(self, h: int, w: int, device: torch.device) -> Tensor | None:
        if not self.shift:
            return None
        ws, s = self.ws, self.ws // 2
        img = torch.zeros(h, w, device=device)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                img[hs, wsl] = cnt
                cnt += 1
        win = img.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
        diff = win[:, None, :] - win[:, :, None]
        return torch.where(diff != 0, float("-inf"), 0.0)  # (nW, T, T)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, C, H, W), H and W multiples of window
        n, c, h, w = x.shape
        ws, s = self.ws, self.ws // 2
        t = x.permute(0, 2, 3, 1)
        if self.shift:
            t = torch.roll(t, shifts=(-s, -s), dims=(1, 2))
        win = (
            t.reshape(n, h // ws, ws, w // ws, ws, c)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(-1, ws * ws, c)
        )
        qkv = self.qkv(self.norm1(win)).reshape(
            win.shape[0], ws * ws, 3, self.heads, c // self.heads
        )
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        rel_index: Tensor = self.rel_index  # type: ignore[assignment]
        bias = self.rel_bias[rel_index].permute(2, 0, 1)  # (heads, T, T)
        mask = self._mask(h, w, x.device)
        if mask is not None:
            bias = (bias[None, :] + mask[:, None]).repeat(n, 1, 1, 1)  # (n*nW, heads, T, T)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out = self.proj(attn.transpose(1, 2).reshape(win.shape[0], ws * ws, c))
        win = win + out
        win = win + self.mlp(self.norm2(win))
        t = (
            win.reshape(n, h // ws, w // ws, ws, ws, c)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(n, h, w, c)
        )
        if self.shift:
            t = torch.roll(t, shifts=(s, s), dims=(1, 2))
        return t.permute(0, 3, 1, 2)


def _conv3d_band_offsets(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv3d(x, weight, bias, padding=k // 2)`` as one 2D convolution over the bands as a batch.

    ``x`` (N, Cin, B, H, W) is viewed as N*B images of Cin channels; one conv2d with the kernel's
    k band slices stacked as k*Cout output channels gives every band's contribution to its
    neighbours, which are then added with the band offset (shift-add along B, zero padded).
    Exactly the useful multiply-adds, plus k - 1 additions per output voxel.
    """
    n, cin, b, h, w = x.shape
    cout, k = weight.shape[0], weight.shape[2]
    p = k // 2
    xb = x.transpose(1, 2).reshape(n * b, cin, h, w)
    wk = weight.permute(2, 0, 1, 3, 4).reshape(k * cout, cin, k, weight.shape[-1])
    y = F.conv2d(xb, wk, None, padding=(weight.shape[-2] // 2, weight.shape[-1] // 2)).reshape(
        n, b, k, cout, h, w
    )
    out = y[:, :, p].clone()
    for d in range(k):  # output band j reads input band j + d - p
        off = d - p
        if off < 0:
            out[:, -off:] += y[:, : b + off, d]
        elif off > 0:
            out[:, : b - off] += y[:, off:, d]
    if bias is not None:
        out += bias[None, None, :, None, None]
    return out.transpose(1, 2)


def conv3d_banded(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """kxkxk convolution (zero padding k // 2) of ``x`` (N, Cin, B, H, W): ``F.conv3d(x, weight, bias, padding=k // 2)``.

    Computed without structural zeros: every multiply-add pairs a kernel tap with an input voxel
    (counted FLOPs equal the useful ones, ``benchmarks/flops.py``). Earlier versions folded the
    band axis into channels and ran one 2D convolution with a block-banded (Cout*B, Cin*B, 3, 3)
    kernel of which only 3 of B band diagonals are non-zero (4-6x the map's useful FLOPs; issue 22).

    Two exact formulations, chosen by shape from measurements of the DECSC map on the development
    CPU (1 thread, N=2 windows of 64x64 and 96x96 pixels, ``docs/benchmarks.md``):

    - ``Cout > 1``: a true 3D convolution, input handed to oneDNN in ``channels_last_3d`` order
      (one copy): 1.1-1.3x faster than the plain layout for the few channels used here;
    - ``Cout == 1`` (the synthesis ``D_u``): :func:`_conv3d_band_offsets`, one 2D convolution with
      k output channels and a shift-add along the bands; oneDNN's 3D kernels handle a single output
      channel poorly (slower than the old folded form there), this one was ~1.6x faster.
    """
    if weight.shape[0] == 1:
        return _conv3d_band_offsets(x, weight, bias)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    return F.conv3d(x, weight, bias, padding=weight.shape[-1] // 2)


#: the old name (same contract: equals ``F.conv3d(x, weight, bias, padding=1)``), kept for callers
conv3d_folded = conv3d_banded


class DifferenceConv3d(nn.Module):
    """Sum of five 3x3x3 convolutions (vanilla, central, horizontal, vertical, band difference),
    merged into one kernel at run time so it costs a single conv3d (:func:`conv3d_banded`)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(5, ch, ch, 3, 3, 3))
        self.bias = nn.Parameter(torch.zeros(ch))
        nn.init.normal_(self.w, std=0.02 / math.sqrt(ch))

    def kernel(self) -> Tensor:
        van, cen, hor, ver, band = self.w
        k = van.clone()
        # central difference: sum_p w_p (x_p - x_center)
        k = k + cen
        k[:, :, 1, 1, 1] = k[:, :, 1, 1, 1] - cen.sum(dim=(2, 3, 4))
        # horizontal / vertical / band differences: left-right, top-bottom, front-back pairs
        k[:, :, :, :, 0] += hor[:, :, :, :, 0]
        k[:, :, :, :, 2] -= hor[:, :, :, :, 0]
        k[:, :, :, 0, :] += ver[:, :, :, 0, :]
        k[:, :, :, 2, :] -= ver[:, :, :, 0, :]
        k[:, :, 0] += band[:, :, 0]
        k[:, :, 2] -= band[:, :, 0]
        return k

    def forward(self, x: Tensor) -> Tensor:
        return conv3d_banded(x, self.kernel(), self.bias)


class DetailEnhancement(nn.Module):
    """Difference convolutions followed by a gated attention map (residual)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.diff = DifferenceConv3d(ch)
        self.gate_w = nn.Parameter(torch.zeros(ch, ch))
        self.gate_b = nn.Parameter(torch.zeros(ch))

    def forward(self, u: Tensor) -> Tensor:
        d = self.diff(u)
        gate = (
            torch.einsum("oc,ncbhw->nobhw", self.gate_w, d) + self.gate_b[None, :, None, None, None]
        )
        return u + torch.sigmoid(gate) * d


class DECSCMap(nn.Module):
    """The fixed-point map over the packed sparse codes ``z = (a, u)``."""

    def __init__(self, cfg: DECSCConfig) -> None:
        super().__init__()
        b, k, c, p = cfg.bands, cfg.shared_features, cfg.unshared_features, cfg.kernel // 2
        self.cfg = cfg
        self.enc_c = nn.Conv2d(b, k, cfg.kernel, padding=p, bias=False)
        self.dec_c = nn.Conv2d(k, b, cfg.kernel, padding=p, bias=False)
        self.enc_u = nn.Conv3d(1, c, cfg.kernel, padding=p, bias=False)
        self.dec_u = nn.Conv3d(c, 1, cfg.kernel, padding=p, bias=False)
        self.transformer = nn.Sequential(
            WindowAttention(k, cfg.window, cfg.heads, cfg.mlp_ratio, shift=False),
            WindowAttention(k, cfg.window, cfg.heads, cfg.mlp_ratio, shift=True),
        )
        self.dem = DetailEnhancement(c)
        # thresholds: softplus(theta) * sigma + softplus(eps) * 1e-2
        self.theta_c = nn.Parameter(torch.full((k,), -1.0))
        self.theta_u = nn.Parameter(torch.full((c,), -1.0))
        self.eps_c = nn.Parameter(torch.full((k,), -4.0))
        self.eps_u = nn.Parameter(torch.full((c,), -4.0))
        # analysis ~ step * synthesis^T keeps the ISTA step contractive at initialisation
        with torch.no_grad():
            nn.init.normal_(self.dec_c.weight, std=1.0 / math.sqrt(k * cfg.kernel**2))
            self.enc_c.weight.copy_(0.3 * self.dec_c.weight.flip(2, 3).transpose(0, 1))
            nn.init.normal_(self.dec_u.weight, std=1.0 / math.sqrt(c * cfg.kernel**3))
            self.enc_u.weight.copy_(0.3 * self.dec_u.weight.flip(2, 3, 4).transpose(0, 1))

    def sizes(self, h: int, w: int) -> tuple[int, int]:
        return self.cfg.shared_features * h * w, self.cfg.unshared_features * self.cfg.bands * h * w

    def unpack(self, z: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
        na, _ = self.sizes(h, w)
        n, cfg = z.shape[0], self.cfg
        a = z[:, :na].reshape(n, cfg.shared_features, h, w)
        u = z[:, na:].reshape(n, cfg.unshared_features, cfg.bands, h, w)
        return a, u

    def synth(self, z: Tensor, h: int, w: int) -> Tensor:
        """Clean estimate ``C + U`` from the codes."""
        a, u = self.unpack(z, h, w)
        return self.dec_c(a) + conv3d_banded(u, self.dec_u.weight)[:, 0]

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        b = self.cfg.bands
        y, s = x[:, :b], x[:, b:]  # noisy window, per-band sigma map
        h, w = y.shape[-2:]
        a, u = self.unpack(z, h, w)
        r = y - self.dec_c(a) - conv3d_banded(u, self.dec_u.weight)[:, 0]
        a_new = self.transformer(a + self.enc_c(r))
        t_c = (
            F.softplus(self.theta_c)[None, :, None, None] * s.mean(1, keepdim=True)
            + 1e-2 * F.softplus(self.eps_c)[None, :, None, None]
        )
        a_new = soft_threshold(a_new, t_c)
        u_new = self.dem(u + conv3d_banded(r[:, None], self.enc_u.weight))
        t_u = (
            F.softplus(self.theta_u)[None, :, None, None, None] * s[:, None]
            + 1e-2 * F.softplus(self.eps_u)[None, :, None, None, None]
        )
        u_new = soft_threshold(u_new, t_u)
        return torch.cat([a_new.flatten(1), u_new.flatten(1)], dim=1)


class DECSC(nn.Module):
    """DECSC denoiser on windows of exactly ``cfg.bands`` bands: ``forward(y) -> (x, stats)``.

    ``y``: (N, bands, H, W) noisy reflectance; ``sigma`` (N, bands) optional per-band noise std
    (estimated from ``y`` when omitted). H and W are reflect-padded to multiples of the attention
    window internally. ``z0`` warm-starts the solver (codes of a previous call, see ``last_z``).
    """

    def __init__(
        self,
        cfg: DECSCConfig | None = None,
        *,
        tol: float = 1e-3,
        max_iter: int = 12,
        eval_max_iter: int = 30,
        backward: str = "implicit",
        backward_max_iter: int = 12,
        m: int = 5,
        phantom_steps: int = 3,
        phantom_tau: float = 0.6,
    ) -> None:
        super().__init__()
        self.cfg = cfg or DECSCConfig()
        self.map = DECSCMap(self.cfg)
        self.deq = DEQFixedPoint(
            self.map,
            init=self._init,
            method="anderson",
            tol=tol,
            max_iter=max_iter,
            eval_max_iter=eval_max_iter,
            m=m,
            backward=backward,
            backward_max_iter=backward_max_iter,
            backward_tol=tol,
            phantom_steps=phantom_steps,
            phantom_tau=phantom_tau,
        )
        self.last_z: Tensor | None = None

    def _init(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        return x.new_zeros(x.shape[0], sum(self.map.sizes(h, w)))

    def forward(
        self,
        y: Tensor,
        sigma: Tensor | None = None,
        z0: Tensor | None = None,
        max_iter: int | None = None,
    ) -> tuple[Tensor, SolverStats]:
        if y.ndim != 4 or y.shape[1] != self.cfg.bands:
            raise ConfigError(
                f"DECSC expects (N, {self.cfg.bands}, H, W) windows, got shape {tuple(y.shape)!r}; "
                "use workers.denoise.api.denoise_cube for other band counts"
            )
        n, b, h, w = y.shape
        ws = self.cfg.window
        ph, pw = (-h) % ws, (-w) % ws
        if sigma is None:
            sigma = estimate_sigma(y)
        if ph or pw:
            mode = "reflect" if (ph < h and pw < w) else "replicate"
            y = F.pad(y, (0, pw, 0, ph), mode=mode)
        x = torch.cat([y, sigma[:, :, None, None].expand(n, b, *y.shape[-2:]).to(y.dtype)], dim=1)
        z, stats = self.deq(x, z0=z0, max_iter=max_iter)
        self.last_z = z.detach()
        out = self.map.synth(z, *y.shape[-2:])
        return out[..., :h, :w], stats
