"""DEQ-Unmix's options as one frozen value, and what generic code needs to know about the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class UnmixOptions:
    """What DEQ-Unmix computes: ``endmembers`` (None: estimated from the scene) and the fit's
    ``epochs`` cap (None: the fit's default, with early stopping)."""

    endmembers: int | None = None
    epochs: int | None = None

    stage = "unmix"
    model = "deq-unmix"

    def __post_init__(self) -> None:
        n = self.endmembers
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 2):
            raise ConfigError(
                f"endmembers must be an integer >= 2 (or None to estimate it), got {n!r}"
            )
        e = self.epochs
        if e is not None and (not isinstance(e, int) or isinstance(e, bool) or e < 1):
            raise ConfigError(
                f"unmix epochs must be a positive integer or None (the fit's default), got {e!r}"
            )

    def halo(self) -> int:
        from workers.registry import get_spec

        return int(get_spec(self.model).halo)

    def weights(self) -> dict[str, str | None]:
        """Fitted per scene: no shipped weights (the fit's own hash is recorded per run)."""
        return {self.model: None}

    def algorithm(self) -> dict[str, Any]:
        from workers.registry import get_spec
        from workers.unmix.fit import DEFAULTS, LMM_TOLERANCE, PURE_TOLERANCE

        # the endmember start's gates decide the fit, so they are part of the run id
        start = {
            "lmm_tolerance": LMM_TOLERANCE,
            "pure_tolerance": PURE_TOLERANCE,
            "noise_floor": "regression, dof-corrected",
        }
        return {
            "solver": get_spec(self.model).solver,
            "fit": DEFAULTS,
            "start": start,
            **asdict(self),
        }

    def memory_parts(self, rows: int, cols: int, n_bands: int, device: str) -> dict[str, int]:
        return {}  # the per-pixel solve is within the io part

    def preload(self) -> dict[str, Any]:
        return {}

    def tile_model(self, device: str, fit_dir: Any = None) -> Any:
        """The :class:`pipeline.runner.TileModel` that unmixes one tile with the scene's fit in ``fit_dir``."""
        from pipeline.errors import ProvenanceError
        from workers.infer import UnmixTileModel

        if fit_dir is None:
            raise ProvenanceError(
                "the unmix stage needs the scene's fit; run the fit_unmixer stage first"
            )
        return UnmixTileModel.from_fit(fit_dir, device)

    def fit_kwargs(self) -> dict[str, Any]:
        return {} if self.epochs is None else {"max_epochs": self.epochs}
