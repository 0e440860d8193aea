"""Pydantic parameter models of the Prefect flows.

Prefect validates flow parameters against these models (so a deployment's form in the UI and a
``run_deployment`` call are checked before any work starts); contradictory options are rejected
here, with messages that say what to change. ``RunOptions.to_run_config`` hands the numbers to the
library's frozen :class:`pipeline.config.RunConfig`, which validates them once more.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY_DIR = REPO_ROOT / "deploy"
SENSORS_FILE = DEPLOY_DIR / "sensors.yaml"
DEMO_SCENE = REPO_ROOT / "tests" / "data" / "demo" / "enmap_potsdam_mosaic_18tiles.tif"
#: the window ``(row0, row1, col0, col1)`` of DEMO_SCENE that ``hyperdeq demo`` processes by default:
#: 96 × 96 px (2 × 2 tiles of 64 px, 11 % nodata in two corners) so that the full flow (DECSC +
#: DEQ-Unmix) stays within minutes on a 2-core laptop; ``hyperdeq demo --full`` takes the whole mosaic
DEMO_WINDOW = (80, 176, 64, 160)


class RunOptions(BaseModel):
    """What to compute (mirrors the hashed fields of ``RunConfig``; ``None`` = library default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tile: int = Field(128, gt=0, description="tile core size in pixels")
    halo: int | None = Field(None, ge=0, description="context pixels each side (None: model halo)")
    blend: Literal["hann", "uniform", "crop"] = "hann"
    out_chunk: int | None = Field(None, gt=0, description="spatial chunk of the outputs")
    denoise: bool = True
    unmix: bool = True
    n_endmembers: int | None = Field(None, ge=2, description="endmembers (None: estimate)")
    seed: int = Field(0, ge=0)
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    batch_size: int = Field(4, gt=0, description="tiles per Dask task")
    tile_memory_mb: float = Field(3072.0, gt=0, description="per-tile memory budget of a worker in MiB")
    denoise_arch: Literal["shipped", "full"] = Field(
        "shipped", description="DECSC weights: shipped (small, CPU-friendly) or full (full-size, for GPUs)")
    denoise_guard: bool = Field(
        True, description="DECSC's band guard: hand part of the input back per band where the model over-smooths")
    denoise_subspace: int = Field(
        8, ge=0, le=64, description="DECSC's spectral-subspace pass: dimension k (0: the model alone)")

    @model_validator(mode="after")
    def _consistent(self) -> RunOptions:
        if not self.denoise and not self.unmix:
            raise ValueError(
                "nothing to do: denoise=False and unmix=False; enable at least one stage"
            )
        if self.n_endmembers is not None and not self.unmix:
            raise ValueError(
                f"n_endmembers={self.n_endmembers!r} was given but unmix=False; "
                "drop the endmember count or enable unmixing"
            )
        if self.halo is not None and self.halo >= self.tile:
            raise ValueError(
                f"halo {self.halo!r} must be smaller than tile {self.tile!r}; raise tile or lower halo"
            )
        return self

    def to_run_config(self, out_root: str | Path, cluster: ClusterOptions | None = None) -> Any:
        """The library's ``RunConfig`` for these options (ConfigError if it refuses them)."""
        from pipeline.config import RunConfig

        fields = self.model_dump()
        extra: dict[str, Any] = {}
        if cluster is not None and cluster.kind == "local" and cluster.n_workers is not None:
            extra["workers"] = cluster.n_workers
        if cluster is not None and cluster.kind == "address":
            extra["scheduler"] = cluster.address
        known = set(getattr(RunConfig, "__dataclass_fields__", {}))
        kwargs = {k: v for k, v in {**fields, **extra}.items() if k in known}
        return RunConfig(out_root=Path(out_root), **kwargs)


class ClusterOptions(BaseModel):
    """Where the tile batches run.

    ``local``: a LocalCluster started for the run (``n_workers`` processes, default: one per
    2 cores); ``address``: an existing scheduler (``tcp://host:8786`` or ``tls://...``);
    ``cuda``: a dask-cuda LocalCUDACluster, one worker per visible GPU, each with ``GPU=1``.
    ``recipe`` points at a YAML file under ``deploy/cluster`` whose ``cluster`` mapping fills
    the LocalCluster / LocalCUDACluster keyword arguments.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["local", "address", "cuda"] = "local"
    address: str | None = Field(None, description="scheduler address for kind='address'")
    n_workers: int | None = Field(None, gt=0)
    threads_per_worker: int = Field(1, gt=0)
    memory_limit: str | None = Field(None, description="per worker, e.g. '4GiB'")
    recipe: str | None = Field(None, description="deploy/cluster/*.yaml with LocalCluster kwargs")

    @field_validator("address")
    @classmethod
    def _address_shape(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip()
        if not v or "://" not in v:
            raise ValueError(
                f"scheduler address {v!r} needs a protocol, e.g. 'tcp://10.0.0.5:8786' or "
                "'tls://scheduler:8786'"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ClusterOptions:
        if self.kind == "address" and self.address is None:
            raise ValueError("kind='address' needs address='tcp://host:port' of a running scheduler")
        if self.kind != "address" and self.address is not None:
            raise ValueError(
                f"address={self.address!r} is only used with kind='address' (got kind={self.kind!r}); "
                "set kind='address' or drop the address"
            )
        if self.kind == "address" and (self.n_workers is not None or self.recipe is not None):
            raise ValueError(
                "n_workers/recipe start a cluster; they cannot be combined with kind='address' "
                "(size the existing cluster instead)"
            )
        if self.recipe is not None:
            if not resolve_recipe(self.recipe).is_file():
                raise ValueError(
                    f"cluster recipe {self.recipe!r} does not exist; use a file under "
                    f"{str(DEPLOY_DIR / 'cluster')!r}"
                )
            rkind = load_recipe(self.recipe).get("kind")
            if rkind is not None and rkind != self.kind:
                raise ValueError(
                    f"cluster recipe {self.recipe!r} is for kind={rkind!r} but kind={self.kind!r} "
                    f"was asked for; pass kind={rkind!r} or another recipe"
                )
        return self

    def cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for LocalCluster/LocalCUDACluster (recipe values, then explicit ones)."""
        kw: dict[str, Any] = {}
        if self.recipe is not None:
            rec = load_recipe(self.recipe)
            kw.update(rec.get("cluster", {}) or {})
            if rec.get("worker_env"):
                kw["env"] = {str(k): str(v) for k, v in rec["worker_env"].items()}
        if self.n_workers is not None:
            kw["n_workers"] = self.n_workers
        kw.setdefault("threads_per_worker", self.threads_per_worker)
        if self.memory_limit is not None:
            kw["memory_limit"] = self.memory_limit
        if self.kind == "local":
            kw.setdefault("n_workers", max(1, (os.cpu_count() or 2) // 2))
        return kw


def resolve_recipe(name: str) -> Path:
    """A recipe path: as given when it exists, else ``deploy/cluster/<name>[.yaml]``."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (DEPLOY_DIR / "cluster" / name, DEPLOY_DIR / "cluster" / f"{name}.yaml"):
        if cand.is_file():
            return cand
    return p


def load_recipe(name: str) -> dict[str, Any]:
    """Parse a cluster recipe YAML file into a dict."""
    path = resolve_recipe(name)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read cluster recipe {str(path)!r}: {exc}; fix the YAML") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"cluster recipe {str(path)!r} must be a mapping, got {type(data).__name__!r}")
    return data


class SceneParams(BaseModel):
    """Parameters of one ``process_scene`` run (validated as a whole)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scene: str
    out_dir: str
    options: RunOptions = RunOptions()
    cluster: ClusterOptions = ClusterOptions()

    @field_validator("scene")
    @classmethod
    def _scene_exists(cls, v: str) -> str:
        p = Path(v).expanduser()
        if not p.exists():
            raise ValueError(f"scene {v!r} does not exist; give the path of a scene file or zarr store")
        return str(p.resolve())

    @field_validator("out_dir")
    @classmethod
    def _out_dir_ok(cls, v: str) -> str:
        p = Path(v).expanduser()
        if p.exists() and not p.is_dir():
            raise ValueError(f"out_dir {v!r} exists and is not a directory; choose another output folder")
        return str(p.resolve())


class SweepParams(BaseModel):
    """Parameters of one ``sweep_archive`` run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str | None = Field(None, description="archive root to scan with the sensor patterns")
    list_file: str | None = Field(None, description="text file with one scene path per line")
    out_root: str = "hyperdeq-out"
    sensors: list[str] | None = Field(None, description="sensor presets to use (default: all)")
    patterns: list[str] | None = Field(None, description="glob patterns overriding the presets")
    max_concurrent: int = Field(2, gt=0, description="scenes processed at the same time")
    options: RunOptions = RunOptions()
    cluster: ClusterOptions = ClusterOptions()

    @model_validator(mode="after")
    def _one_source(self) -> SweepParams:
        if (self.root is None) == (self.list_file is None):
            raise ValueError(
                f"give exactly one of root={self.root!r} (scan with patterns) or "
                f"list_file={self.list_file!r} (explicit scene list)"
            )
        if self.list_file is not None and (self.patterns or self.sensors):
            raise ValueError("patterns/sensors only apply to root scans, not to a list_file")
        return self
