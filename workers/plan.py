"""A run's job (configuration + model options) and its plan: frozen values with one serialisation."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from workers.denoise.options import DenoiseOptions
from workers.unmix.options import UnmixOptions

ModelOptions = DenoiseOptions | UnmixOptions


# ---------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class Job:
    """What to compute: the run configuration and each enabled model's own options (None: off)."""

    config: RunConfig = field(default_factory=RunConfig)
    denoise: DenoiseOptions | None = field(default_factory=DenoiseOptions)
    unmix: UnmixOptions | None = field(default_factory=UnmixOptions)

    def __post_init__(self) -> None:
        if self.denoise is None and self.unmix is None:
            raise ConfigError(
                "nothing to do: denoising and unmixing are both off; enable at least one"
            )

    @property
    def models(self) -> tuple[ModelOptions, ...]:
        return tuple(m for m in (self.denoise, self.unmix) if m is not None)

    def options(self, stage: str) -> ModelOptions:
        m = {"denoise": self.denoise, "unmix": self.unmix}.get(stage)
        if m is None:
            raise ConfigError(f"stage {stage!r} is not enabled in this run")
        return m

    def replace(self, **changes: Any) -> Job:
        return dataclasses.replace(self, **changes)

    def model_parts(self, rows: int, cols: int, n_bands: int) -> dict[str, int]:
        parts: dict[str, int] = {}
        for m in self.models:
            parts.update(m.memory_parts(rows, cols, n_bands, self.config.device))
        return parts

    def preload(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in self.models:
            out.update(m.preload())
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            **{m.stage: dataclasses.asdict(m) for m in self.models},
        }


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class RunPlan:
    """A planned run: resolved job, identity (input digest, config hash, weights) and folder."""

    scene: Path
    job: Job
    input_sha256: str
    config_hash: str
    weights: dict[str, str | None]
    halos: dict[str, int]
    run_id: str
    run_dir: Path
    scene_info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> RunConfig:
        return self.job.config

    def check_tile_memory(self, n_bands: int, scene_hw: tuple[int, int] | None = None) -> None:
        rows, cols = self.config.read_window(scene_hw)
        self.config.check_tile_memory(n_bands, self.job.model_parts(rows, cols, n_bands), scene_hw)

    def record_head(self) -> dict[str, Any]:
        """The fields every state of ``run.json`` starts with."""
        return {
            "run_id": self.run_id,
            "input": {
                "path": str(self.scene.resolve()),
                "sha256": self.input_sha256,
                **self.scene_info,
            },
            "config": self.job.to_dict(),
            "config_hash": self.config_hash,
            "weights": self.weights,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.record_head(), "run_dir": str(self.run_dir), "halos": self.halos}


def config_hash(job: Job) -> str:
    """The configuration hash a run is named by: the run configuration plus each model's algorithm
    (its options, solver settings and architecture), so a release that changes how a model computes
    never resumes tiles or reuses a fit computed the old way."""
    algo = {m.stage: m.algorithm() for m in job.models}
    blob = json.dumps([job.config.config_hash(), algo], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
