"""Baseline registry, the noise-case description and the shared array plumbing."""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import ConfigError, ModelError
from pipeline.noise import check_case, is_iid_gaussian, oracle_sigma


@dataclass(frozen=True)
class CaseInfo:
    """What a baseline may know about the noise: the case name and its per-band Gaussian σ."""

    case: str
    sigmas: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        check_case(self.case)
        s = np.asarray(self.sigmas, dtype=np.float64)
        if s.ndim != 1 or s.size == 0 or np.any(s < 0) or not np.all(np.isfinite(s)):
            raise ConfigError(
                f"CaseInfo.sigmas must be a non-empty 1-D array of finite σ >= 0, got {s!r}"
            )

    @property
    def iid(self) -> bool:
        """True when the noise is i.i.d. Gaussian (FastHyDe's ``iid`` switch)."""
        return is_iid_gaussian(self.case)

    @property
    def oracle_sigma(self) -> float:
        """RMS of the per-band σ: the single σ BM4D is given."""
        return oracle_sigma(self.sigmas)


@dataclass(frozen=True)
class Baseline:
    """A classical denoiser: its name, settings shown in reports, the packages it needs."""

    name: str
    settings: str
    packages: tuple[str, ...]
    entry: str  # "<module>:<function>" under workers.baselines, called as f(noisy, info)

    def denoise(self, noisy: np.ndarray, info: CaseInfo) -> np.ndarray:
        """Denoise ``noisy`` (``(B, H, W)``, [0, 1] scale); float32 ``(B, H, W)`` result."""
        ok, why = availability(self.name)
        if not ok:
            raise ModelError(why)
        arr = np.asarray(noisy)
        if arr.ndim != 3 or info.sigmas.size != arr.shape[0]:
            raise ConfigError(
                f"baseline {self.name!r} needs a (B, H, W) cube and one σ per band, got shape "
                f"{arr.shape!r} and {info.sigmas.size!r} σ values"
            )
        module, func = self.entry.split(":")
        fn: Callable[[np.ndarray, CaseInfo], np.ndarray] = getattr(
            importlib.import_module(f"workers.baselines.{module}"), func
        )
        out = np.asarray(fn(arr.astype(np.float64), info), dtype=np.float32)
        if out.shape != arr.shape:
            raise ModelError(
                f"baseline {self.name!r} returned shape {out.shape!r} for input {arr.shape!r}"
            )
        return out

    def versions(self) -> dict[str, str]:
        """Installed versions of the packages this baseline uses."""
        out = {}
        for dist in self.packages:
            try:
                out[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                out[dist] = "missing"
        return out


_BASELINES: dict[str, Baseline] = {
    "fasthyde": Baseline(
        "fasthyde",
        "k=10, iid=True for Gaussian i.i.d. cases else False",
        ("hyde-images", "bm3d"),
        "hyde_methods:fasthyde",
    ),
    "l1hymixde": Baseline(
        "l1hymixde", "k=8, p=0.1, 10 iterations", ("hyde-images",), "hyde_methods:l1hymixde"
    ),
    "wsrrr": Baseline(
        "wsrrr", "rank=10", ("hyde-images", "pytorch-wavelets"), "hyde_methods:wsrrr"
    ),
    "bm4d": Baseline(
        "bm4d", "oracle σ = RMS of per-band σ, profile 'np'", ("bm4d",), "bm4d_method:denoise"
    ),
}
BASELINE_NAMES: tuple[str, ...] = tuple(_BASELINES)

# import name per baseline: checked by availability()
_IMPORTS = {"fasthyde": "hyde", "l1hymixde": "hyde", "wsrrr": "hyde", "bm4d": "bm4d"}


def get_baseline(name: str) -> Baseline:
    """The baseline registered as ``name``; an unknown name lists the valid ones."""
    if name not in _BASELINES:
        raise ConfigError(
            f"unknown baseline {name!r}; valid baselines are {list(BASELINE_NAMES)!r} (or 'none')"
        )
    return _BASELINES[name]


def availability(name: str) -> tuple[bool, str]:
    """Whether ``name`` can run here, and if not a one-line reason with the install hint."""
    get_baseline(name)
    mod = _IMPORTS[name]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(mod)
    except Exception as exc:  # noqa: BLE001 - any import failure means "cannot run"
        return False, (
            f"baseline {name!r} skipped: importing {mod!r} failed ({type(exc).__name__}: {exc}); "
            "install the 'baselines' extra with --no-deps as docs/evaluation.md explains"
        )
    return True, ""
