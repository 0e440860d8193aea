"""Registry spec of DEQ-Unmix (fitted per scene: no shipped weights)."""

from __future__ import annotations

from workers.registry import ModelSpec, SolverConfig
from workers.unmix.fit import DEFAULTS

SPEC = ModelSpec(
    name="deq-unmix",
    # each map application sees 3×3 neighbours, so k solver iterations reach k pixels; the fixed
    # point spreads influence further with geometric decay. 16 pixels each side is a conservative
    # choice: the default fit on the demo mosaic is exact when tiled; a net trained every epoch
    # leaves up to 3e-2 (6.6e-3 at halo 32) (docs/benchmarks/seams_unmix*.md, the model card).
    halo=16,
    band_handling="fitted per scene on its own good bands",
    solver=SolverConfig(
        method="anderson",
        tol=DEFAULTS["tol"],
        max_iter=DEFAULTS["train_max_iter"],
        eval_max_iter=DEFAULTS["eval_max_iter"],
        m=DEFAULTS["anderson_m"],
        per_pixel=True,
        backward="implicit",
    ),
    config={"hidden": DEFAULTS["hidden"]},
)
