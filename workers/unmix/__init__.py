"""DEQ-Unmix unmixer, classical baselines (VCA, N-FINDR, FCLS, HySime), scene-scale fit/apply."""

from workers.unmix.fit import UnmixFit, apply_fit, fit_scene, write_endmembers

__all__ = ["UnmixFit", "apply_fit", "fit_scene", "write_endmembers"]
