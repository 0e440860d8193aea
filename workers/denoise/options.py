"""DECSC's options as one frozen value, and everything generic code needs to know about the model.

The run layer (``workers.run``) never branches on the model's name: it asks these options for the
weights map, the algorithm settings that name a run, the per-tile memory, the tile model and the
blending mix (the band guard's per-band weights).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.errors import ConfigError

#: DECSC weights the pipeline can run: the small default and the full-size model
ARCHS: tuple[str, ...] = ("shipped", "full")

#: DECSC's working memory for one tile: a fixed part plus a part per pixel (not per band: it
#: denoises 31-band windows two at a time, with their Anderson history). Measured as the peak RSS
#: a tile's ``denoise_cube`` adds on the 2-core CPU (``python -m benchmarks.tile_memory``, EnMAP
#: demo tiles of 218 bands: ``docs/benchmarks/tile_memory*.md``), with a margin. On a GPU worker
#: this is device memory and not counted against the worker's RAM.
FIXED_BYTES: dict[str, int] = {"shipped": 64 * 2**20, "full": 512 * 2**20}
BYTES_PER_PIXEL: dict[str, int] = {"shipped": 72_000, "full": 160_000}
#: the spectral-subspace pass's numpy work (cleaning, projections, two passes' outputs), in
#: multiples of the tile's float32 input; it runs on the worker's CPU whatever the device
SUBSPACE_MEMORY_FACTOR = 8


@dataclass(frozen=True)
class DenoiseOptions:
    """What DECSC computes.

    ``arch``: which weights run: ``shipped`` (small, the default, fast on CPUs) or ``full`` (the
    full-size model: better, about 7x the compute; meant for GPUs). ``guard``: the band guard after
    the model (hands part of the input back per band where the model over-smooths). ``subspace``:
    dimension of the spectral-subspace pass (the model, cleaning, projection onto each tile's top-k
    noise-whitened spectral directions, the model again); 0 turns it off.
    """

    arch: str = "shipped"
    guard: bool = True
    subspace: int = 8

    stage = "denoise"
    model = "decsc"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(
                f"unknown denoiser {self.arch!r}; choose one of {list(ARCHS)!r} "
                "(shipped: the small default model; full: the full-size model, best on a GPU)"
            )
        if not isinstance(self.guard, bool):
            raise ConfigError(f"guard must be True or False, got {self.guard!r}")
        if (
            not isinstance(self.subspace, int)
            or isinstance(self.subspace, bool)
            or not 0 <= self.subspace <= 64
        ):
            raise ConfigError(
                f"subspace must be an integer from 0 (off) to 64, got {self.subspace!r}; "
                "the default 8 suits airborne scenes (docs/models/decsc.md)"
            )

    # ------------------------------------------------------------------ identity
    def halo(self) -> int:
        from workers.registry import get_spec

        return int(get_spec(self.model).halo)

    def weights(self) -> dict[str, str | None]:
        """sha256 of every weights file this configuration loads (they name the run)."""
        from workers.denoise.api import arch_weights
        from workers.denoise.spec import GUARD_WEIGHTS_SHA256

        out: dict[str, str | None] = {self.model: arch_weights(self.arch)[1]}
        if self.guard:
            out[f"{self.model}-guard"] = GUARD_WEIGHTS_SHA256
        return out

    def algorithm(self) -> dict[str, Any]:
        """Settings of how the model computes (solver, architecture, passes): part of the run hash."""
        from workers.denoise.api import ARCH_PRESETS
        from workers.registry import get_spec

        spec = get_spec(self.model)
        return {
            "solver": spec.solver,
            "config": {**spec.config, **ARCH_PRESETS[self.arch]},
            **asdict(self),
        }

    # ------------------------------------------------------------------ resources
    def memory_parts(self, rows: int, cols: int, n_bands: int, device: str) -> dict[str, int]:
        """Peak bytes of one ``rows`` x ``cols`` tile of ``n_bands`` bands in a worker's RAM, by part."""
        px = int(rows) * int(cols)
        parts = {"decsc": 0, "subspace": 0}
        if not device.startswith("cuda"):  # "auto" may fall back to the CPU: count it
            parts["decsc"] = FIXED_BYTES[self.arch] + px * BYTES_PER_PIXEL[self.arch]
        if self.subspace:
            parts["subspace"] = px * int(n_bands) * 4 * SUBSPACE_MEMORY_FACTOR
        return parts

    def preload(self) -> dict[str, Any]:
        """Keyword arguments of the worker plugin that loads this model once per worker."""
        return {"models": (self.model,), "weights": {self.model: self.arch}}

    # ------------------------------------------------------------------ compute
    def tile_model(self, device: str, fit_dir: Any = None) -> Any:
        """The :class:`pipeline.runner.TileModel` that denoises one tile (``fit_dir`` unused: shipped weights)."""
        from workers.infer import DenoiseTileModel

        return DenoiseTileModel.from_registry(device, self.arch, self.guard, self.subspace)

    def blend_mix(
        self, tile_stats: Iterable[Mapping[str, Any] | None]
    ) -> tuple[list[float] | None, dict[str, Any]]:
        """The band guard's scene-wide per-band weights (the tiles' own averaged by valid pixels),
        applied as the tiles are blended (``out + w (input - out)``), and their provenance record."""
        if not self.guard:
            return None, {}
        from workers.denoise.guard import scene_weights
        from workers.denoise.spec import GUARD_WEIGHTS_FILE, GUARD_WEIGHTS_SHA256

        mix = scene_weights(tile_stats)
        if mix is None:
            return None, {}
        rec = {
            "band_guard": {
                "file": GUARD_WEIGHTS_FILE,
                "sha256": GUARD_WEIGHTS_SHA256,
                "scope": "scene (tile weights averaged by valid pixels)",
                "w": [round(float(v), 6) for v in mix],
            }
        }
        return [float(v) for v in mix], rec
