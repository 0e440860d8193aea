"""Model registry: look models up by name; an unknown name lists the valid ones.

Each model module defines a frozen :class:`ModelSpec` named ``SPEC``; the registry imports it
lazily so that ``import workers.registry`` stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.errors import ModelError, WeightsError
from pipeline.hashing import sha256_file

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# name -> "module:attribute" holding the ModelSpec
_KNOWN: dict[str, str] = {
    "decsc": "workers.denoise.spec:SPEC",
    "deq-unmix": "workers.unmix.spec:SPEC",
}


@dataclass(frozen=True)
class WeightsRef:
    """One shipped weights file (under ``workers/weights``) and its expected sha256."""

    file: str
    sha256: str

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file


@dataclass(frozen=True)
class SolverConfig(Mapping[str, Any]):
    """Fixed-point solver settings of a model, typed; read as a mapping too (``spec.solver["tol"]``).

    ``max_iter``/``backward_max_iter``: forward/backward iterations in training; ``eval_max_iter``:
    the forward cap at inference; ``m``, ``lam``: Anderson's history and regularisation;
    ``backward``: ``implicit`` or ``phantom`` (with ``phantom_steps``, ``phantom_tau``);
    ``per_pixel``: per-pixel stopping (the unmixer).
    """

    method: str = "anderson"
    tol: float = 1e-3
    max_iter: int = 6
    eval_max_iter: int = 12
    backward_max_iter: int | None = None
    m: int = 5
    lam: float = 1e-4
    backward: str = "implicit"
    phantom_steps: int = 3
    phantom_tau: float = 0.6
    per_pixel: bool = False

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about a model, as a frozen value.

    ``halo``: context pixels each side of a tile core the model needs for a seam-free result.
    ``band_handling``: how the model meets arbitrary band counts (free text, shown in provenance).
    ``solver``: its fixed-point solver settings. ``weights``: the shipped weights files by name
    (empty for per-scene fitted models); ``default_weights`` names the one loaded by default.
    ``config``: architecture hyper-parameters needed to rebuild the module. ``loader``:
    ``"module:function"`` that loads the model as ``function(device, weights_name)`` (workers preload it).
    """

    name: str
    halo: int
    band_handling: str
    solver: SolverConfig = field(default_factory=SolverConfig)
    weights: Mapping[str, WeightsRef] = field(default_factory=dict)
    default_weights: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    loader: str | None = None

    def __post_init__(self) -> None:
        if self.halo < 0:
            raise ModelError(f"model {self.name!r}: halo must be >= 0, got {self.halo!r}")
        if self.default_weights is not None and self.default_weights not in self.weights:
            raise ModelError(
                f"model {self.name!r}: default weights {self.default_weights!r} are not among its weights "
                f"{sorted(self.weights)!r}"
            )

    def weights_ref(self, key: str | None = None) -> WeightsRef:
        """The weights file named ``key`` (default: :attr:`default_weights`)."""
        k = key or self.default_weights
        if k is None or k not in self.weights:
            raise WeightsError(
                f"model {self.name!r} has no weights {k!r}; it ships {sorted(self.weights)!r}"
            )
        return self.weights[k]

    @property
    def weights_file(self) -> str | None:
        return self.weights[self.default_weights].file if self.default_weights else None

    @property
    def weights_sha256(self) -> str | None:
        return self.weights[self.default_weights].sha256 if self.default_weights else None

    @property
    def weights_path(self) -> Path | None:
        return self.weights[self.default_weights].path if self.default_weights else None


def list_models() -> list[str]:
    return sorted(_KNOWN)


def get_spec(name: str) -> ModelSpec:
    """Return the spec registered under ``name``."""
    if name not in _KNOWN:
        raise ModelError(f"unknown model {name!r}; valid models are {list_models()!r}")
    module, attr = _KNOWN[name].split(":")
    spec = getattr(importlib.import_module(module), attr)
    if not isinstance(spec, ModelSpec) or spec.name != name:
        raise ModelError(
            f"registry entry {name!r} does not point at its ModelSpec ({_KNOWN[name]!r})"
        )
    return spec


def verified_weights_path(
    spec: ModelSpec, path: str | Path | None = None, *, key: str | None = None
) -> Path:
    """The shipped weights file ``key`` of ``spec`` (default: its default weights), or ``path``,
    after checking it exists, is safetensors and (for a shipped file) its sha256 matches.

    Only safetensors files are accepted: never pickle.
    """
    if path is None and not spec.weights:
        raise WeightsError(
            f"model {spec.name!r} has no shipped weights file; it is fitted per scene"
        )
    ref = spec.weights_ref(key) if path is None else None
    p = Path(path) if path is not None else ref.path  # type: ignore[union-attr]
    if p.suffix != ".safetensors":
        raise WeightsError(
            f"weights must be a .safetensors file, got {str(p)!r}; pickled checkpoints are refused "
            "because loading them can execute code"
        )
    if not p.is_file():
        raise WeightsError(
            f"weights file {str(p)!r} for model {spec.name!r} does not exist; reinstall hyperdeq"
        )
    digest = sha256_file(p)
    if ref is not None and digest != ref.sha256:
        raise WeightsError(
            f"weights file {str(p)!r} has sha256 {digest!r} but model {spec.name!r} expects "
            f"{ref.sha256!r}: the file was modified or belongs to another model; "
            "reinstall hyperdeq or retrain"
        )
    return p
