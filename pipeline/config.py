"""Run configuration: one frozen value, validated at construction, with a stable hash.

The hash (:meth:`RunConfig.config_hash`) names a run: rerunning a scene with the same hash and the
same weights resumes (and reuses) that run; any change in a field that can change the numbers gives
a new run. Fields that only change *how fast* a run goes (workers, scheduler address, tiles per
task) are left out of the hash on purpose: outputs are independent of them (tested).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import ConfigError

BlendWindow = Literal["hann", "uniform", "crop"]
BLEND_WINDOWS: tuple[str, ...] = ("hann", "uniform", "crop")
_DEVICE_RE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")

#: DECSC weights the pipeline can run (workers.denoise.api.ARCH_PRESETS)
DENOISE_ARCHS: tuple[str, ...] = ("shipped", "full")

# fields that may change the numbers of a run (and so enter the hash)
HASHED_FIELDS: tuple[str, ...] = (
    "tile",
    "halo",
    "blend",
    "out_chunk",
    "denoise",
    "unmix",
    "n_endmembers",
    "unmix_epochs",
    "seed",
    "device",
    "denoise_arch",
    "denoise_guard",
    "denoise_subspace",
)

# bytes per pixel-band a tile needs at peak, relative to the float32 input (input, outputs,
# blending, the unmixer's per-pixel solve): a conservative multiplier used for the memory check
MODEL_MEMORY_FACTOR = 12
#: DECSC's working memory for one tile: a fixed part plus a part per pixel (not per band: it
#: denoises 31-band windows two at a time, with their Anderson history). Measured as the peak RSS
#: a tile's ``denoise_cube`` adds on the 2-core CPU (``python -m benchmarks.tile_memory``, EnMAP
#: demo tiles of 218 bands: ``docs/benchmarks/tile_memory*.md``), with a margin: shipped 64–160 px
#: tiles 0.66–1.88 GB, full size 64–128 px 1.0–2.9 GB. On a GPU worker this is device memory.
DECSC_FIXED_BYTES: dict[str, int] = {"shipped": 64 * 2**20, "full": 512 * 2**20}
DECSC_BYTES_PER_PIXEL: dict[str, int] = {"shipped": 72_000, "full": 160_000}
#: the spectral-subspace pass's numpy work (cleaning, projections, two passes' outputs), in
#: multiples of the tile's float32 input; it runs on the worker's CPU whatever the device
SUBSPACE_MEMORY_FACTOR = 8


@dataclass(frozen=True)
class RunConfig:
    """Everything a tiled run needs to know, checked once.

    ``tile``: core size in pixels. ``halo``: context each side (None: the largest halo the enabled
    models declare; resolve it with :meth:`with_model_halos`). ``blend``: window used to weight
    overlapping tile outputs. ``unmix`` with ``n_endmembers=None`` estimates the number of
    endmembers. ``workers``/``scheduler``: a local cluster of N workers or an existing scheduler.
    ``tile_memory_mb``: the most memory one tile may need on a worker; a tile over it is refused.
    ``out_chunk``: spatial chunk of the outputs (one blend task per chunk; default: ``tile``).
    ``denoise_arch``: which DECSC weights run: ``shipped`` (small, the default, fast on CPUs) or
    ``full`` (the full-size model: better, ~7× the compute; meant for GPUs). ``denoise_guard``:
    DECSC's band guard after the model (hands part of the input back per band where the model
    over-smooths; ``workers.denoise.guard``); on by default. ``denoise_subspace``: dimension of
    DECSC's spectral-subspace pass (``workers.denoise.subspace``: the model, cleaning, projection
    onto each tile's top-k noise-whitened spectral directions, the model again); 0 turns it off.
    """

    out_root: Path = Path("hyperdeq-out")
    tile: int = 128
    halo: int | None = None
    blend: str = "hann"
    out_chunk: int | None = None
    denoise: bool = True
    unmix: bool = True
    n_endmembers: int | None = None
    unmix_epochs: int | None = None
    seed: int = 0
    workers: int | None = None
    scheduler: str | None = None
    device: str = "cpu"
    batch_size: int = 4
    tile_memory_mb: float = 3072.0
    denoise_arch: str = "shipped"
    denoise_guard: bool = True
    denoise_subspace: int = 8
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_root", Path(self.out_root))
        for name in ("tile", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}; pass e.g. {name}=128")
        if self.halo is not None:
            if not isinstance(self.halo, int) or isinstance(self.halo, bool) or self.halo < 0:
                raise ConfigError(f"halo must be an integer >= 0, got {self.halo!r}; pass e.g. halo=16")
            if self.halo >= self.tile:
                raise ConfigError(
                    f"halo {self.halo!r} must be smaller than the tile {self.tile!r}: each tile would "
                    "read more context than the pixels it is responsible for; raise --tile or lower --halo"
                )
        if self.blend not in BLEND_WINDOWS:
            raise ConfigError(
                f"unknown blend window {self.blend!r}; choose one of {list(BLEND_WINDOWS)!r}"
            )
        if self.out_chunk is not None and (not isinstance(self.out_chunk, int) or self.out_chunk <= 0):
            raise ConfigError(f"out_chunk must be a positive integer or None, got {self.out_chunk!r}")
        if not self.denoise and not self.unmix:
            raise ConfigError(
                f"nothing to do: denoise={self.denoise!r} and unmix={self.unmix!r}; enable at least one"
            )
        if self.n_endmembers is not None:
            if not self.unmix:
                raise ConfigError(
                    f"n_endmembers={self.n_endmembers!r} was given but unmixing is off; "
                    "drop --no-unmix or the endmember count"
                )
            if not isinstance(self.n_endmembers, int) or isinstance(self.n_endmembers, bool) or self.n_endmembers < 2:
                raise ConfigError(
                    f"n_endmembers must be an integer >= 2 (or None to estimate it), got {self.n_endmembers!r}"
                )
        if self.unmix_epochs is not None and (not isinstance(self.unmix_epochs, int) or self.unmix_epochs < 1):
            raise ConfigError(f"unmix_epochs must be a positive integer or None (the fit's default), got {self.unmix_epochs!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.workers is not None:
            if not isinstance(self.workers, int) or self.workers <= 0:
                raise ConfigError(f"workers must be a positive integer, got {self.workers!r}")
            if self.scheduler is not None:
                raise ConfigError(
                    f"give either workers={self.workers!r} (start a local cluster) or "
                    f"scheduler={self.scheduler!r} (use an existing one), not both"
                )
        if self.scheduler is not None and not str(self.scheduler).strip():
            raise ConfigError(f"scheduler address is empty ({self.scheduler!r}); give host:port or leave it unset")
        if not _DEVICE_RE.match(str(self.device)):
            raise ConfigError(
                f"unknown device {self.device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'"
            )
        if (not isinstance(self.denoise_subspace, int) or isinstance(self.denoise_subspace, bool)
                or not 0 <= self.denoise_subspace <= 64):
            raise ConfigError(
                f"denoise_subspace must be an integer from 0 (off) to 64, got {self.denoise_subspace!r}; "
                "the default 8 suits airborne scenes (docs/models/decsc.md)"
            )
        if self.denoise_arch not in DENOISE_ARCHS:
            raise ConfigError(
                f"unknown denoiser {self.denoise_arch!r}; choose one of {list(DENOISE_ARCHS)!r} "
                "(shipped: the small default model; full: the full-size model, best on a GPU)"
            )
        if not (self.tile_memory_mb > 0):
            raise ConfigError(f"tile_memory_mb must be > 0, got {self.tile_memory_mb!r}")
        # the band-independent part (DECSC's per-pixel memory) is known now; with halo None this
        # is a lower bound (the core alone), checked again with the halo and the bands at tiling
        self.check_tile_memory(1)

    # ------------------------------------------------------------------ derived values
    @property
    def read_size(self) -> int:
        """Side of the largest read window (core plus halo on both sides)."""
        return self.tile + 2 * (self.halo or 0)

    @property
    def chunk(self) -> int:
        """Spatial chunk of the outputs."""
        return self.out_chunk or self.tile

    def with_model_halos(self, halos: list[int] | tuple[int, ...]) -> RunConfig:
        """Return a copy whose halo is the largest model halo when none was given explicitly."""
        if self.halo is not None:
            return self
        halo = max([0, *[int(h) for h in halos]])
        if halo >= self.tile:
            raise ConfigError(
                f"the models need a halo of {halo!r} pixels, not smaller than the tile {self.tile!r}; "
                "raise --tile"
            )
        return dataclasses.replace(self, halo=halo)

    def replace(self, **changes: Any) -> RunConfig:
        """A new, re-validated config with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def tile_memory_parts(self, n_bands: int) -> dict[str, int]:
        """Peak bytes one tile needs in a worker's RAM for ``n_bands`` bands, by part: ``io``
        (input, outputs, blending, unmixing: :data:`MODEL_MEMORY_FACTOR` × the float32 input),
        ``decsc`` (the denoiser's working memory, :data:`DECSC_FIXED_BYTES` plus
        :data:`DECSC_BYTES_PER_PIXEL` per pixel; 0 on a GPU device, where it is device memory) and
        ``subspace`` (its spectral-subspace pass, :data:`SUBSPACE_MEMORY_FACTOR` × the input)."""
        px = self.read_size**2
        inp = px * int(n_bands) * 4
        parts = {"io": inp * MODEL_MEMORY_FACTOR, "decsc": 0, "subspace": 0}
        if self.denoise:
            if not self.device.startswith("cuda"):  # "auto" may fall back to the CPU: count it
                arch = self.denoise_arch if self.denoise_arch in DECSC_BYTES_PER_PIXEL else "full"
                parts["decsc"] = DECSC_FIXED_BYTES[arch] + px * DECSC_BYTES_PER_PIXEL[arch]
            if self.denoise_subspace:
                parts["subspace"] = inp * SUBSPACE_MEMORY_FACTOR
        return parts

    def estimate_tile_bytes(self, n_bands: int) -> int:
        """Peak bytes one tile needs in a worker's RAM for ``n_bands`` bands (conservative; the
        sum of :meth:`tile_memory_parts`)."""
        return int(sum(self.tile_memory_parts(n_bands).values()))

    def check_tile_memory(self, n_bands: int) -> None:
        """Refuse a tile that would need more than ``tile_memory_mb``."""
        parts = self.tile_memory_parts(n_bands)
        need = sum(parts.values()) / 2**20
        if need > self.tile_memory_mb:
            detail = ", ".join(f"{k} {round(v / 2**20)} MiB" for k, v in parts.items() if round(v / 2**20) >= 1)
            raise ConfigError(
                f"a {self.read_size}x{self.read_size} px tile of {n_bands!r} bands needs about "
                f"{need:.0f} MiB ({detail}), over the per-tile memory budget of {self.tile_memory_mb!r} MiB; "
                "lower --tile/--halo or raise the budget with --tile-memory (RunConfig.tile_memory_mb) "
                "if the workers have the memory"
            )

    # ------------------------------------------------------------------ identity
    def hashed_dict(self) -> dict[str, Any]:
        """The fields that can change the numbers, as plain JSON values."""
        return {k: getattr(self, k) for k in HASHED_FIELDS}

    def config_hash(self) -> str:
        """sha256 of the sorted-key JSON of :meth:`hashed_dict` (stable across processes)."""
        if self.halo is None:
            raise ConfigError(
                "config_hash needs a resolved halo (got halo=None); call with_model_halos() first"
            )
        blob = json.dumps(self.hashed_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-ready values (for the run record)."""
        d = dataclasses.asdict(self)
        d["out_root"] = str(self.out_root)
        return d
