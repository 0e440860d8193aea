"""DEQ-Unmix unmixer, classical baselines (VCA, N-FINDR, FCLS, HySime), scene-scale fit/apply.

The scene-level names are imported lazily so that the model module (``workers.unmix.deq_unmix``)
loads without the geospatial stack (a GPU benchmark machine has torch but no GDAL).
"""

from __future__ import annotations

from typing import Any

__all__ = ["UnmixFit", "apply_fit", "fit_scene", "write_endmembers"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from workers.unmix import fit

        return getattr(fit, name)
    raise AttributeError(f"module 'workers.unmix' has no attribute {name!r}")
