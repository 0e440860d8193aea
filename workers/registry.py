"""Model registry: look models up by name; an unknown name lists the valid ones.

Each model module defines a frozen :class:`ModelSpec` named ``SPEC``; the registry imports it
lazily so that ``import workers.registry`` stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
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
class ModelSpec:
    """What the pipeline needs to know about a model, as a frozen value.

    ``halo``: context pixels each side of a tile core the model needs for a seam-free result.
    ``band_handling``: how the model meets arbitrary band counts (free text, shown in provenance).
    ``solver``: fixed-point solver settings (method, tol, max_iter, eval_max_iter, ...).
    ``weights_file``: file name under ``workers/weights`` (None for per-scene fitted models).
    ``weights_sha256``: expected hash of that file.
    ``config``: architecture hyper-parameters needed to rebuild the module.
    """

    name: str
    halo: int
    band_handling: str
    solver: dict[str, Any] = field(default_factory=dict)
    weights_file: str | None = None
    weights_sha256: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.halo < 0:
            raise ModelError(f"model {self.name!r}: halo must be >= 0, got {self.halo!r}")
        if (self.weights_file is None) != (self.weights_sha256 is None):
            raise ModelError(
                f"model {self.name!r}: give both weights_file and weights_sha256, or neither"
            )

    @property
    def weights_path(self) -> Path | None:
        return None if self.weights_file is None else WEIGHTS_DIR / self.weights_file


def list_models() -> list[str]:
    return sorted(_KNOWN)


def get_spec(name: str) -> ModelSpec:
    """Return the spec registered under ``name``."""
    if name not in _KNOWN:
        raise ModelError(f"unknown model {name!r}; valid models are {list_models()!r}")
    module, attr = _KNOWN[name].split(":")
    spec = getattr(importlib.import_module(module), attr)
    if not isinstance(spec, ModelSpec) or spec.name != name:
        raise ModelError(f"registry entry {name!r} does not point at its ModelSpec ({_KNOWN[name]!r})")
    return spec


def verified_weights_path(spec: ModelSpec, path: str | Path | None = None) -> Path:
    """The weights file of ``spec`` (or ``path``), after checking it exists and its sha256 matches.

    Only safetensors files are accepted: never pickle.
    """
    p = Path(path) if path is not None else spec.weights_path
    if p is None:
        raise WeightsError(f"model {spec.name!r} has no shipped weights file; it is fitted per scene")
    if p.suffix != ".safetensors":
        raise WeightsError(
            f"weights must be a .safetensors file, got {str(p)!r}; pickled checkpoints are refused "
            "because loading them can execute code"
        )
    if not p.is_file():
        raise WeightsError(f"weights file {str(p)!r} for model {spec.name!r} does not exist; reinstall hyperdeq")
    digest = sha256_file(p)
    if spec.weights_sha256 is not None and path is None and digest != spec.weights_sha256:
        raise WeightsError(
            f"weights file {str(p)!r} has sha256 {digest!r} but model {spec.name!r} expects "
            f"{spec.weights_sha256!r}: the file was modified or belongs to another model; "
            "reinstall hyperdeq or retrain"
        )
    return p
