"""Tile models: the :class:`pipeline.runner.TileModel` implementations the pipeline runs on workers.

Each is a small frozen, picklable value (a name, a device, a weights hash); the torch module
behind it is loaded lazily, once per process, through :func:`get_model` (the Dask worker plugin
fills the same cache at worker start-up, with the weights hash checked).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ModelError
from pipeline.hashing import sha256_tree

_CACHE: dict[tuple[Any, ...], Any] = {}
_LOCK = threading.Lock()


def get_model(key: tuple[Any, ...], loader: Callable[[], Any]) -> Any:
    """The object cached under ``key`` in this process, built by ``loader`` the first time."""
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = loader()
        return _CACHE[key]


def cached_keys() -> list[tuple[Any, ...]]:
    """Keys of the models loaded in this process (for tests and worker reports)."""
    with _LOCK:
        return list(_CACHE)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a CUDA device is present, else ``cpu``; refuse cuda without one."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(
            f"device {device!r} was asked for but no CUDA device is present; use device='cpu'"
        )
    return device


def gpu_name(import_torch: bool = True) -> str | None:
    """Name of CUDA device 0, or None without one (``import_torch=False``: only when torch is loaded)."""
    import sys

    if not import_torch and "torch" not in sys.modules:
        return None
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # no torch or no CUDA means no GPU
        return None


def worker_name() -> str:
    """The Dask worker address when running in one, else ``host:pid``."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except Exception:
        return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class IdentityTileModel:
    """Returns its input: the pipeline's geometry check (tile → identity → blend == input)."""

    halo: int = 0
    name: str = "identity"
    weights_sha256: str | None = None
    out_names: tuple[str, ...] | None = None

    def __call__(self, cube: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        return np.array(cube, dtype=np.float32, copy=True), {
            "iterations": 0,
            "residual": 0.0,
            "converged": True,
            "device": "cpu",
            "worker": worker_name(),
        }


def load_decsc(device: str, arch: str = "shipped") -> Any:
    """Load the DECSC denoiser (architecture ``arch``) on ``device``; weights hash checked by its loader."""
    from workers.denoise.api import load_denoiser

    return load_denoiser(device=device, arch=arch)


@dataclass(frozen=True)
class DenoiseTileModel:
    """DECSC on one tile: ``(B_good, h, w)`` → same shape, NaN kept as nodata."""

    device: str = "cpu"
    halo: int = 0
    weights_sha256: str | None = None
    name: str = "decsc"
    out_names: tuple[str, ...] | None = None
    arch: str = "shipped"  # DECSC architecture preset: shipped (default) or full
    guard: bool = True  # DECSC's band guard after the model (workers.denoise.guard)
    subspace: int = (
        0  # spectral-subspace pass dimension (workers.denoise.subspace); 0: the model alone
    )

    @classmethod
    def from_registry(
        cls, device: str = "cpu", arch: str = "shipped", guard: bool = True, subspace: int = 0
    ) -> DenoiseTileModel:
        from workers.denoise.api import arch_weights
        from workers.registry import get_spec

        spec = get_spec("decsc")
        return cls(
            device=device,
            halo=int(spec.halo),
            weights_sha256=arch_weights(arch)[1],
            arch=arch,
            guard=guard,
            subspace=subspace,
        )

    def module(self) -> Any:
        dev = resolve_device(self.device)
        return get_model(("decsc", dev, self.weights_sha256), lambda: load_decsc(dev, self.arch))

    def __call__(self, cube: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        from workers.denoise.api import denoise_cube

        dev = resolve_device(self.device)
        # the guard's weights are reported per tile and applied scene-wide when the tiles are blended
        out, stats = denoise_cube(
            self.module(),
            np.asarray(cube, dtype=np.float32),
            device=dev,
            guard="weights" if self.guard else "off",
            subspace=self.subspace,
        )
        return np.asarray(out, dtype=np.float32), {
            **_scalar_stats(stats),
            "device": dev,
            "worker": worker_name(),
        }


def _scalar_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """Solver stats as JSON scalars (per-sample arrays reduced: max iterations/residual, all converged);
    the band guard's per-band weights (``guard_w``) stay a list of floats."""
    out = dict(stats)
    for k, red in (("iterations", np.max), ("residual", np.max), ("converged", np.all)):
        if k in out and out[k] is not None:
            v = np.asarray(out[k])
            out[k] = red(v).item() if v.size else None
    kept = {
        k: (v.item() if isinstance(v, np.generic) else v)
        for k, v in out.items()
        if isinstance(v, int | float | bool | str | np.generic | type(None))
    }
    if isinstance(out.get("guard_w"), list | tuple | np.ndarray):
        kept["guard_w"] = [float(v) for v in out["guard_w"]]
    return kept


def load_fit(fit_dir: str) -> Any:
    from workers.unmix.fit import UnmixFit

    return UnmixFit.load(fit_dir)


@dataclass(frozen=True)
class UnmixTileModel:
    """DEQ-Unmix with a per-scene fit on one tile: ``(B_good, h, w)`` → ``(P + 1, h, w)``.

    Channels are the P abundances then the per-pixel reconstruction RMSE.
    """

    fit_dir: str
    halo: int = 0
    weights_sha256: str | None = None
    out_names: tuple[str, ...] | None = None
    device: str = "cpu"
    name: str = "deq-unmix"
    endmember_names: tuple[str, ...] = field(default=())

    @classmethod
    def from_fit(cls, fit_dir: str | Path, device: str = "cpu") -> UnmixTileModel:
        from workers.registry import get_spec

        spec = get_spec("deq-unmix")
        fit = load_fit(str(fit_dir))
        names = tuple(str(n) for n in fit.names)
        return cls(
            fit_dir=str(fit_dir),
            halo=int(spec.halo),
            weights_sha256=sha256_tree(fit_dir),
            out_names=(*names, "rmse"),
            device=device,
            endmember_names=names,
        )

    def fit(self) -> Any:
        return get_model(
            ("deq-unmix", self.fit_dir, self.weights_sha256), lambda: load_fit(self.fit_dir)
        )

    def __call__(self, cube: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        from workers.unmix.fit import apply_fit

        fit = self.fit()
        module = get_model(("deq-unmix-module", self.fit_dir, self.weights_sha256), fit.model)
        abund, rmse, stats = apply_fit(fit, np.asarray(cube, dtype=np.float32), model=module)
        out = np.concatenate(
            [np.asarray(abund, np.float32), np.asarray(rmse, np.float32)[None]], axis=0
        )
        return out, {
            **_scalar_stats(dict(stats or {})),
            "device": resolve_device(self.device),
            "worker": worker_name(),
        }
