"""The models the benchmarks time, loaded the way the product loads them.

DECSC comes from its shipped safetensors weights (:func:`workers.denoise.api.load_denoiser`,
hash checked). Until those weights exist the benchmarks time the same architecture with its
deterministic initialisation (seed 0) and say so in every table (``weights`` column): speed per
solver iteration does not depend on the weights, the number of iterations does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import WeightsError
from workers.denoise.options import DenoiseOptions

UNTRAINED = "untrained (seed-0 init; shipped weights absent)"

#: the CLI's spectral-subspace pass dimension: what a user runs
DEFAULT_SUBSPACE = DenoiseOptions().subspace


def denoiser(device: str = "cpu") -> tuple[Any, str]:
    """``(module, weights label)``: the shipped DECSC, or its untrained twin when no weights ship yet."""
    import torch

    from workers.denoise.api import build_model, load_denoiser
    from workers.registry import get_spec

    try:
        model = load_denoiser(device=device)
        sha = get_spec("decsc").weights_sha256 or ""
        return model, f"shipped sha256 {sha[:12]}"
    except WeightsError:
        torch.manual_seed(0)
        return build_model("cpu").to(device).eval(), UNTRAINED


def weights_sha() -> str | None:
    """The registry hash when the shipped weights verify, else None (untrained run)."""
    from workers.registry import get_spec, verified_weights_path

    try:
        verified_weights_path(get_spec("decsc"))
        return get_spec("decsc").weights_sha256
    except WeightsError:
        return None


@dataclass(frozen=True)
class BenchDenoiser:
    """DECSC as a pipeline tile model with an optional solver cap and a fixed torch thread count.

    The same call as :class:`workers.infer.DenoiseTileModel` with the CLI's defaults
    (``denoise_cube`` on the tile, band guard, spectral-subspace pass of :data:`DEFAULT_SUBSPACE`), plus
    ``max_iter`` (smoke runs cap the solver) and ``threads`` (torch threads in the worker: 1 for
    the scaling measurement). Small and picklable; the module is cached once per process.
    """

    device: str = "cpu"
    halo: int = 16
    weights_sha256: str | None = None
    max_iter: int | None = None
    threads: int | None = 1
    name: str = "decsc"
    out_names: tuple[str, ...] | None = None

    def module(self) -> Any:
        from workers.infer import get_model

        return get_model(
            ("bench-decsc", self.device, self.weights_sha256), lambda: denoiser(self.device)[0]
        )

    def __call__(self, cube: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        import torch

        from workers.denoise.api import denoise_cube
        from workers.infer import worker_name

        if self.threads:
            torch.set_num_threads(int(self.threads))
        out, stats = denoise_cube(
            self.module(),
            np.asarray(cube, dtype=np.float32),
            device=self.device,
            max_iter=self.max_iter,
            guard="weights",
            subspace=DEFAULT_SUBSPACE,
        )
        return np.asarray(out, np.float32), {
            **stats,
            "device": self.device,
            "worker": worker_name(),
            "pid": os.getpid(),
        }


def bench_denoiser(device: str, max_iter: int | None, threads: int | None = 1) -> BenchDenoiser:
    from workers.registry import get_spec

    return BenchDenoiser(
        device=device,
        halo=int(get_spec("decsc").halo),
        weights_sha256=weights_sha(),
        max_iter=max_iter,
        threads=threads,
    )


def warm_worker(model: Any) -> int:
    """Load ``model``'s weights in this (worker) process by running it on a tiny cube; returns the pid."""
    model(np.full((8, 16, 16), 0.1, np.float32))
    return os.getpid()
