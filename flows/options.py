"""The one option table of a run: every CLI command and every Prefect flow is built from it.

Each :class:`Opt` names a field of the run configuration (:class:`pipeline.config.RunConfig`), of a
model's options (:class:`workers.denoise.options.DenoiseOptions`,
:class:`workers.unmix.options.UnmixOptions`), of the cluster (:class:`workers.cluster.ClusterSpec`)
or of the job itself (which models run). Defaults come from those frozen values, so they are
declared once; this table only adds the flag and the help text. From it come:

* :data:`RunOptions`: the Prefect flows' parameter model (the deployment form: one described
  field per option);
* :func:`add_run_options`: the same options on ``hyperdeq run``, ``flow run``, ``sweep``, ``serve``;
* :func:`build`: the :class:`workers.run.Job` and :class:`workers.cluster.ClusterSpec` they mean.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from pipeline.config import RunConfig
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Opt:
    """One option: its name (CLI ``--name`` with ``_`` as ``-``), where its value goes, its help."""

    name: str
    target: str  # "config" | "denoise" | "unmix" | "cluster" | "job"
    field: str
    type: Any
    help: str
    flag: str | None = None  # e.g. "--guard/--no-guard"; default: --<name>

    def cli_flag(self) -> str:
        if self.flag:
            return self.flag
        base = "--" + self.name.replace("_", "-")
        return f"{base}/--no-{base[2:]}" if self.type is bool else base


def _defaults() -> dict[str, dict[str, Any]]:
    from workers.cluster import ClusterSpec
    from workers.denoise.options import DenoiseOptions
    from workers.unmix.options import UnmixOptions

    out: dict[str, dict[str, Any]] = {}
    for target, cls in (
        ("config", RunConfig),
        ("denoise", DenoiseOptions),
        ("unmix", UnmixOptions),
        ("cluster", ClusterSpec),
    ):
        out[target] = {
            f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
            for f in dataclasses.fields(cls)
        }
    out["job"] = {"denoise": True, "unmix": True}
    return out


OPTIONS: tuple[Opt, ...] = (
    Opt(
        "tile",
        "config",
        "tile",
        int | None,
        "Tile core size in pixels (default: the largest of 128, 112, ... 32 whose tiles fit --tile-memory).",
    ),
    Opt(
        "halo",
        "config",
        "halo",
        int | None,
        "Context pixels read each side of a tile (default: what the models need).",
    ),
    Opt(
        "blend",
        "config",
        "blend",
        str,
        "Window that blends overlapping tiles: hann, uniform or crop.",
    ),
    Opt(
        "out_chunk",
        "config",
        "out_chunk",
        int | None,
        "Spatial chunk of the outputs in pixels (default: the tile).",
    ),
    Opt("seed", "config", "seed", int, "Seed of everything random in the run (the unmixer's fit)."),
    Opt("device", "config", "device", str, "Where models run: cpu, cuda, cuda:N or auto."),
    Opt(
        "batch",
        "config",
        "batch_size",
        int,
        "Most tiles per Dask task (fewer when that keeps every worker busy).",
    ),
    Opt(
        "tile_memory",
        "config",
        "tile_memory_mb",
        float,
        "Per-tile memory budget of a worker in MiB; a larger explicit --tile is refused before any work.",
    ),
    Opt(
        "keep_tiles",
        "config",
        "keep_tiles",
        bool,
        "Keep the intermediate tile stores in a completed run folder (removed by default).",
    ),
    Opt("denoise", "job", "denoise", bool, "Run the DECSC denoiser."),
    Opt(
        "denoiser",
        "denoise",
        "arch",
        str,
        "DECSC weights: shipped (small, the default) or full (full-size, about 7x the compute; for GPUs).",
    ),
    Opt(
        "guard",
        "denoise",
        "guard",
        bool,
        "DECSC's band guard: hand the input back per band where the model over-smooths.",
    ),
    Opt(
        "subspace",
        "denoise",
        "subspace",
        int,
        "DECSC's spectral-subspace pass: dimension k between two model passes (0: the model alone).",
    ),
    Opt(
        "unmix",
        "job",
        "unmix",
        bool,
        "Run the DEQ-Unmix unmixer (fit on the scene, then apply per tile).",
    ),
    Opt(
        "endmembers",
        "unmix",
        "endmembers",
        int | None,
        "Number of endmembers (default: estimated from the scene).",
    ),
    Opt(
        "unmix_epochs",
        "unmix",
        "epochs",
        int | None,
        "Most epochs of the unmixer's fit (default: its own, with early stopping).",
    ),
    Opt(
        "cluster",
        "cluster",
        "kind",
        str,
        "Where tile batches run: local (start a cluster), address (use --scheduler) or cuda (dask-cuda, one worker per GPU).",
    ),
    Opt(
        "scheduler",
        "cluster",
        "address",
        str | None,
        "Address of a running Dask scheduler, e.g. tcp://host:8786.",
    ),
    Opt(
        "workers",
        "cluster",
        "n_workers",
        int | None,
        "Worker processes of a local cluster (default 2).",
    ),
    Opt(
        "threads_per_worker", "cluster", "threads_per_worker", int, "Dask threads per local worker."
    ),
    Opt(
        "memory_limit",
        "cluster",
        "memory_limit",
        str | None,
        "Memory limit per local worker, e.g. 4GiB.",
    ),
    Opt(
        "recipe",
        "cluster",
        "recipe",
        str | None,
        "Cluster recipe: a file under deploy/cluster (local, gpu-dask-cuda) or a path.",
    ),
    Opt(
        "allow_recipe_code",
        "cluster",
        "allow_code",
        bool,
        "Accept recipe keys that load code on the cluster (preload, plugins); only for recipes you trust.",
    ),
)
_BY_NAME = {o.name: o for o in OPTIONS}


#: the scene argument and output option of the commands that process one scene (run, flow run)
SCENE_ARG: Any = typer.Argument(
    ..., help="Input scene (GeoTIFF/COG, ENVI, NetCDF/HDF5, .mat, zarr)."
)
OUT_OPT: Any = typer.Option(
    Path("hyperdeq-out"), "--out", help="Output root; the run lands in OUT/<scene>/<run id>/."
)


def default(opt: Opt) -> Any:
    return _defaults()[opt.target][opt.field]


def build(values: dict[str, Any], out_root: str | Path | None = None) -> tuple[Any, Any]:
    """The ``(Job, ClusterSpec)`` that option ``values`` (by option name) describe; unknown names refused."""
    from workers.cluster import ClusterSpec
    from workers.denoise.options import DenoiseOptions
    from workers.run import Job
    from workers.unmix.options import UnmixOptions

    unknown = sorted(set(values) - set(_BY_NAME))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown!r}; valid ones are {sorted(_BY_NAME)!r}")
    parts: dict[str, dict[str, Any]] = {
        "config": {},
        "denoise": {},
        "unmix": {},
        "cluster": {},
        "job": {},
    }
    for name, v in values.items():
        o = _BY_NAME[name]
        parts[o.target][o.field] = v
    if out_root is not None:
        parts["config"]["out_root"] = Path(out_root)
    job_on = {**_defaults()["job"], **parts["job"]}
    if not job_on["unmix"] and (parts["unmix"].get("endmembers") is not None):
        raise ConfigError(
            f"--endmembers {parts['unmix']['endmembers']!r} was given but unmixing is off; "
            "drop --no-unmix or the endmember count"
        )
    cfg = RunConfig(**parts["config"])
    job = Job(
        config=cfg,
        denoise=DenoiseOptions(**parts["denoise"]) if job_on["denoise"] else None,
        unmix=UnmixOptions(**parts["unmix"]) if job_on["unmix"] else None,
    )
    return job, ClusterSpec(**parts["cluster"])


def _check(model: BaseModel) -> BaseModel:
    try:
        build(model.model_dump())
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return model


def _run_options_model() -> type[BaseModel]:
    fields: dict[str, Any] = {
        o.name: (o.type, Field(default(o), description=o.help)) for o in OPTIONS
    }
    base = type(
        "_Base",
        (BaseModel,),
        {
            "model_config": ConfigDict(extra="forbid", frozen=True),
            "_consistent": model_validator(mode="after")(_check),
        },
    )
    return create_model(
        "RunOptions",
        __base__=base,
        __doc__="Run options (flows/options.py: the one table).",
        **fields,
    )


#: the Prefect flows' parameter model: one described field per option of :data:`OPTIONS`
RunOptions = _run_options_model()


def options_to_build(opts: BaseModel, out_root: str | Path | None = None) -> tuple[Any, Any]:
    """``build`` for a :data:`RunOptions` value."""
    return build(opts.model_dump(), out_root)


def run_options(**values: Any) -> BaseModel:
    """A :data:`RunOptions` from option values, pydantic errors turned into one ConfigError line."""
    from pydantic import ValidationError

    try:
        return RunOptions(**{k: v for k, v in values.items()})
    except ValidationError as exc:
        raise ConfigError(pretty(exc)) from None


def pretty(exc: Any) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ())) or "options"
        parts.append(f"{loc}: {str(e.get('msg')).removeprefix('Value error, ')}")
    return "; ".join(parts)


def add_run_options(
    exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None
) -> Callable[..., Any]:
    """Decorator for a typer command: appends every option of the table (minus ``exclude``) to its
    signature and passes their values, as a :data:`RunOptions`, in the keyword ``options``."""
    overrides = defaults or {}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        import typing

        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in sig.parameters.values()
            if p.name != "options"
        ]
        names = [o.name for o in OPTIONS if o.name not in exclude]
        extra = [
            inspect.Parameter(
                o.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(overrides.get(o.name, default(o)), o.cli_flag(), help=o.help),
                annotation=o.type,
            )
            for o in OPTIONS
            if o.name in names
        ]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {n: kwargs.pop(n) for n in names}
            for n in exclude:
                if n in overrides:
                    values[n] = overrides[n]
            return fn(*args, options=run_options(**values), **kwargs)

        command.__signature__ = sig.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        command.__annotations__ = {
            **{p.name: p.annotation for p in own},
            **{o.name: o.type for o in OPTIONS},
        }
        return command

    return wrap
