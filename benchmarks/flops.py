"""FLOPs of one DECSC map evaluation per window-pixel: counted vs useful (issue 22).

``python -m benchmarks.flops [--size 32]`` prints a markdown table for both shipped weight sets.

* **counted (now)**: what :class:`torch.utils.flop_counter.FlopCounterMode` counts for one
  ``DECSCMap.forward`` on an (1, 2*bands, size, size) input, divided by ``size**2``. The 3x3x3
  convolutions have no structural zeros (:func:`workers.denoise.decsc.conv3d_banded`: a true 3D
  convolution, or for one output channel a 2D convolution over the bands with 3 output channels
  and a shift-add, whose 2 additions per output voxel the counter does not see).
* **counted (folded, before)**: the same, with each 3D convolution replaced by what the old
  ``conv3d_folded`` ran: one 2D convolution with a (cout*B, cin*B, 3, 3) block-banded kernel,
  ``2 * 9 * (cout*B) * (cin*B)`` FLOPs per pixel (only 3 of its B band diagonals non-zero).
* **useful**: every multiply-add of the model's own layers once: the 3D convolutions
  ``2 * 27 * cin * cout * B`` per pixel, plus every other layer as counted (2D convolutions,
  linear layers, the batched matmuls). Taps that fall on zero padding are counted as useful, as
  the usual convolution FLOP convention does (strict count: ``strict useful`` column).

``FlopCounterMode`` does not count CPU flash attention (``scaled_dot_product_attention`` without
a mask, the first transformer block); its FLOPs (``4 * T * C`` per token, T = window^2 tokens
per attention window, C = shared features) are listed separately and are the same in both
formulations. The issue's numbers (492,816 counted, about 117,800 useful, shipped model) are the
counter's, i.e. without that block.
"""

from __future__ import annotations

import argparse
from typing import Any


def _conv3d_shapes(cfg: Any) -> list[tuple[str, int, int]]:
    c = cfg.unshared_features
    return [("enc_u", 1, c), ("dec_u", c, 1), ("dem.diff", c, c)]


def count(arch: str, size: int = 32) -> dict[str, float]:
    """FLOPs per window-pixel of one map evaluation for the shipped ``arch`` weights."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from workers.denoise.api import load_denoiser

    model = load_denoiser(arch=arch)
    cfg = model.cfg
    b = cfg.bands
    x = torch.rand(1, 2 * b, size, size, generator=torch.Generator().manual_seed(0))
    z = torch.zeros(1, sum(model.map.sizes(size, size)))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.map(z, x)
    px = size * size
    by_op = {str(k): v / px for k, v in fc.get_flop_counts()["Global"].items()}
    counted = fc.get_total_flops() / px
    conv3d_useful = sum(2 * 27 * cin * cout * b for _, cin, cout in _conv3d_shapes(cfg))
    conv3d_strict = sum(2 * 9 * cin * cout * (3 * b - 2) for _, cin, cout in _conv3d_shapes(cfg))
    conv3d_folded = sum(2 * 9 * (cout * b) * (cin * b) for _, cin, cout in _conv3d_shapes(cfg))
    conv2d = 2 * (2 * 9 * b * cfg.shared_features)  # enc_c and dec_c
    # the convolution count must be exactly the 3D (true) plus the 2D layers: no hidden zeros
    assert abs(by_op.get("aten.convolution", 0.0) - (conv3d_useful + conv2d)) < 1e-6, by_op
    other = counted - by_op.get("aten.convolution", 0.0)
    t = cfg.window**2
    flash = 4 * t * cfg.shared_features  # q k^T and attn v of the unmasked block, per token
    return {
        "counted_now": counted,
        "counted_folded": conv3d_folded + conv2d + other,
        "useful": conv3d_useful + conv2d + other,
        "strict_useful": conv3d_strict + conv2d + other,
        "conv3d_now": conv3d_useful,
        "conv3d_folded": conv3d_folded,
        "flash_attention_uncounted": flash,
    }


def table(size: int = 32) -> str:
    rows = [
        "| model | counted, folded (before) | counted, now | useful | strict useful | now / useful "
        "| before / useful | 3D convs before | 3D convs now | + CPU flash attention (uncounted, both) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch in ("shipped", "full"):
        r = count(arch, size)
        rows.append(
            f"| {arch} | {r['counted_folded']:,.0f} | {r['counted_now']:,.0f} | {r['useful']:,.0f} "
            f"| {r['strict_useful']:,.0f} | {r['counted_now'] / r['useful']:.3f} "
            f"| {r['counted_folded'] / r['useful']:.2f} | {r['conv3d_folded']:,.0f} | {r['conv3d_now']:,.0f} "
            f"| {r['flash_attention_uncounted']:,.0f} |"
        )
    return (
        "FLOPs per window-pixel per map evaluation (`torch.utils.flop_counter`):\n\n"
        + "\n".join(rows)
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32, help="window size in pixels (a multiple of 8)")
    print(table(ap.parse_args(argv).size))


if __name__ == "__main__":
    main()
