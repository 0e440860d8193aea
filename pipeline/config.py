"""Run configuration: geometry and execution, one frozen value validated at construction.

What each model computes is configured by the model's own frozen options object
(``workers.denoise.options.DenoiseOptions``, ``workers.unmix.options.UnmixOptions``); a run is the
pair of this configuration and those options (``workers.run.Job``). Where the tile batches run
(a local cluster, a scheduler address, a dask-cuda cluster) is ``workers.cluster.ClusterSpec``.

:meth:`RunConfig.config_hash` covers the fields that can change the numbers. Fields that only
change *how fast* a run goes (tiles per task, the per-tile memory budget, the output root, whether
intermediate tiles are kept) are left out on purpose: outputs are independent of them (tested).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import ConfigError

BlendWindow = Literal["hann", "uniform", "crop"]
BLEND_WINDOWS: tuple[str, ...] = ("hann", "uniform", "crop")
_DEVICE_RE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")

#: fields that may change the numbers of a run (and so enter the hash)
HASHED_FIELDS: tuple[str, ...] = ("tile", "halo", "blend", "out_chunk", "seed", "device")

#: bytes per pixel-band a tile needs at peak for I/O, relative to the float32 input (input,
#: outputs, blending, the unmixer's per-pixel solve): a conservative multiplier for the memory check
IO_MEMORY_FACTOR = 12

#: tile sizes tried, largest first, when the tile size is left to the run (``tile=None``)
AUTO_TILES: tuple[int, ...] = (128, 112, 96, 80, 64, 48, 32)
#: default tile size when a model's memory does not constrain it
DEFAULT_TILE = 128


def _positive_int(name: str, v: Any, example: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(
            f"{name} must be a positive integer, got {v!r}; pass e.g. {name}={example}"
        )


@dataclass(frozen=True)
class RunConfig:
    """Geometry and execution of a tiled run, checked once.

    ``tile``: core size in pixels (None: the largest of :data:`AUTO_TILES` whose tiles fit the
    memory budget, resolved per scene by :meth:`resolve_tile`). ``halo``: context each side (None:
    the largest halo the enabled models declare; :meth:`with_model_halos`). ``blend``: window used
    to weight overlapping tile outputs. ``out_chunk``: spatial chunk of the outputs (default: the
    tile). ``device``: where models run (cpu, cuda, cuda:N, auto). ``batch_size``: the most tiles
    per Dask task (fewer when that keeps every worker busy). ``tile_memory_mb``: the most memory one
    tile may need on a worker. ``keep_tiles``: keep the intermediate tile stores of a completed run.
    """

    out_root: Path = Path("hyperdeq-out")
    tile: int | None = None
    halo: int | None = None
    blend: str = "hann"
    out_chunk: int | None = None
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 4
    tile_memory_mb: float = 3072.0
    keep_tiles: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_root", Path(self.out_root))
        if self.tile is not None:
            _positive_int("tile", self.tile, 128)
        _positive_int("batch_size", self.batch_size, 4)
        if self.halo is not None:
            if not isinstance(self.halo, int) or isinstance(self.halo, bool) or self.halo < 0:
                raise ConfigError(
                    f"halo must be an integer >= 0, got {self.halo!r}; pass e.g. halo=16"
                )
            if self.tile is not None and self.halo >= self.tile:
                raise ConfigError(
                    f"halo {self.halo!r} must be smaller than the tile {self.tile!r}: each tile would "
                    "read more context than the pixels it is responsible for; raise --tile or lower --halo"
                )
        if self.blend not in BLEND_WINDOWS:
            raise ConfigError(
                f"unknown blend window {self.blend!r}; choose one of {list(BLEND_WINDOWS)!r}"
            )
        if self.out_chunk is not None:
            if (
                not isinstance(self.out_chunk, int)
                or isinstance(self.out_chunk, bool)
                or self.out_chunk <= 0
            ):
                raise ConfigError(
                    f"out_chunk must be a positive integer or None, got {self.out_chunk!r}"
                )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not _DEVICE_RE.match(str(self.device)):
            raise ConfigError(
                f"unknown device {self.device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'"
            )
        if not isinstance(self.tile_memory_mb, int | float) or not (self.tile_memory_mb > 0):
            raise ConfigError(f"tile_memory_mb must be > 0, got {self.tile_memory_mb!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def read_size(self) -> int:
        """Side of the largest read window (core plus halo on both sides)."""
        return int(self.tile or DEFAULT_TILE) + 2 * (self.halo or 0)

    @property
    def chunk(self) -> int:
        """Spatial chunk of the outputs."""
        return int(self.out_chunk or self.tile or DEFAULT_TILE)

    def with_model_halos(self, halos: list[int] | tuple[int, ...]) -> RunConfig:
        """A copy whose halo is the largest model halo when none was given explicitly."""
        if self.halo is not None:
            return self
        halo = max([0, *[int(h) for h in halos]])
        if self.tile is not None and halo >= self.tile:
            raise ConfigError(
                f"the models need a halo of {halo!r} pixels, not smaller than the tile {self.tile!r}; raise --tile"
            )
        return dataclasses.replace(self, halo=halo)

    def replace(self, **changes: Any) -> RunConfig:
        """A new, re-validated config with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ memory
    def read_window(self, scene_hw: tuple[int, int] | None = None) -> tuple[int, int]:
        """Rows and columns of the largest read window, clipped to the scene when its size is known."""
        side = self.read_size
        if scene_hw is None:
            return side, side
        return min(side, int(scene_hw[0])), min(side, int(scene_hw[1]))

    def tile_memory_parts(
        self,
        n_bands: int,
        model_parts: dict[str, int] | None = None,
        scene_hw: tuple[int, int] | None = None,
    ) -> dict[str, int]:
        """Peak bytes one tile needs in a worker's RAM, by part: ``io`` (:data:`IO_MEMORY_FACTOR` ×
        the float32 input) plus the parts the models report for this window (``model_parts``)."""
        h, w = self.read_window(scene_hw)
        parts = {"io": h * w * int(n_bands) * 4 * IO_MEMORY_FACTOR}
        parts.update(model_parts or {})
        return parts

    def check_tile_memory(
        self,
        n_bands: int,
        model_parts: dict[str, int] | None = None,
        scene_hw: tuple[int, int] | None = None,
    ) -> None:
        """Refuse a tile that would need more than ``tile_memory_mb``."""
        parts = self.tile_memory_parts(n_bands, model_parts, scene_hw)
        need = sum(parts.values()) / 2**20
        if need > self.tile_memory_mb:
            h, w = self.read_window(scene_hw)
            detail = ", ".join(
                f"{k} {round(v / 2**20)} MiB" for k, v in parts.items() if round(v / 2**20) >= 1
            )
            raise ConfigError(
                f"a {h}x{w} px tile of {n_bands!r} bands needs about {need:.0f} MiB ({detail}), over the "
                f"per-tile memory budget of {self.tile_memory_mb!r} MiB; lower --tile/--halo (or leave "
                "--tile unset to let the run choose) or raise the budget with --tile-memory if the workers "
                "have the memory"
            )

    # ------------------------------------------------------------------ identity
    def hashed_dict(self) -> dict[str, Any]:
        """The fields that can change the numbers, as plain JSON values."""
        return {k: getattr(self, k) for k in HASHED_FIELDS}

    def config_hash(self) -> str:
        """sha256 of the sorted-key JSON of :meth:`hashed_dict` (stable across processes)."""
        if self.halo is None or self.tile is None:
            raise ConfigError(
                f"config_hash needs a resolved tile and halo (got tile={self.tile!r}, halo={self.halo!r}); "
                "plan the run first (workers.run.plan_run)"
            )
        blob = json.dumps(self.hashed_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-ready values (for the run record)."""
        d = dataclasses.asdict(self)
        d["out_root"] = str(self.out_root)
        return d
