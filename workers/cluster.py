"""Where tile batches run: one cluster specification and one factory.

* ``kind="address"``: connect to a running scheduler (its workers are whatever was started there).
* ``kind="cuda"``: ``dask_cuda.LocalCUDACluster``, one worker per visible GPU, labelled ``GPU=1``.
* ``kind="local"``: a ``LocalCluster`` of ``n_workers`` worker processes (a CUDA cluster instead when
  the run's device asks for CUDA and a GPU is present).

Model tasks are submitted with ``resources={"GPU": 1}`` only when some worker carries that label
(otherwise they would wait forever); blend and I/O tasks go anywhere. Clients are never the
process-wide default (``set_as_default=False``): in a sweep another scene's client may be closing.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ClusterError, ConfigError

GPU = "GPU"
RECIPE_DIR = Path(__file__).resolve().parents[1] / "deploy" / "cluster"
#: recipe keys that make workers or the scheduler load and run code; refused unless the caller
#: opts in (``allow_code``), because a recipe is configuration and may come from anyone
CODE_KEYS: tuple[str, ...] = (
    "preload",
    "preload_argv",
    "preload_nanny",
    "preload_nanny_argv",
    "plugins",
    "worker_class",
    "scheduler_class",
    "worker_plugins",
    "nanny_plugins",
)
DEFAULT_WORKERS = 2
ClusterKind = Literal["local", "address", "cuda"]


def resolve_recipe(name: str) -> Path:
    """A recipe path: as given when it exists, else ``deploy/cluster/<name>[.yaml]``."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    for cand in (RECIPE_DIR / name, RECIPE_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(
        f"cluster recipe {name!r} does not exist; use a file under {str(RECIPE_DIR)!r} or a path"
    )


def _code_keys(data: Any, where: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            path = f"{where}.{k}" if where else str(k)
            if str(k) in CODE_KEYS:
                found.append(path)
            found += _code_keys(v, path)
    return found


def load_recipe(name: str, allow_code: bool = False) -> dict[str, Any]:
    """Parse a cluster recipe; refuse code-loading keys unless ``allow_code``."""
    path = resolve_recipe(name)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read cluster recipe {str(path)!r}: {exc}; fix the YAML") from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"cluster recipe {str(path)!r} must be a mapping, got {type(data).__name__!r}"
        )
    bad = _code_keys(data)
    if bad and not allow_code:
        raise ConfigError(
            f"cluster recipe {str(path)!r} sets {bad!r}, which make the cluster load and run code; "
            "remove them, or pass --allow-recipe-code if you trust this recipe (docs/deploy.md)"
        )
    if "cluster" in data and not isinstance(data["cluster"], dict | type(None)):
        raise ConfigError(
            f"cluster recipe {str(path)!r}: 'cluster' must be a mapping of keyword arguments"
        )
    return data


def _check_recipe_values(path: str, kw: dict[str, Any]) -> None:
    for key in ("n_workers", "threads_per_worker"):
        v = kw.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ConfigError(
                f"cluster recipe {path!r}: {key} must be a positive integer, got {v!r}; e.g. {key}: 2"
            )


@dataclass(frozen=True)
class ClusterSpec:
    """Where the tile batches of a run go (see the module docstring for the kinds).

    ``n_workers``: local worker processes (default 2); ``threads_per_worker``: Dask threads per
    worker (torch then gets ``cores / workers`` threads each); ``memory_limit``: per worker, e.g.
    ``'4GiB'``; ``recipe``: a YAML file under ``deploy/cluster`` whose ``cluster`` mapping fills the
    LocalCluster / LocalCUDACluster keyword arguments and ``worker_env`` the workers' environment;
    ``allow_code``: accept recipe keys that load code on the cluster.
    """

    kind: ClusterKind = "local"
    address: str | None = None
    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | None = None
    recipe: str | None = None
    allow_code: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("local", "address", "cuda"):
            raise ConfigError(
                f"unknown cluster kind {self.kind!r}; choose 'local', 'address' or 'cuda'"
            )
        if self.address is not None:
            a = str(self.address).strip()
            if not a:
                raise ConfigError(
                    f"scheduler address is empty ({self.address!r}); give tcp://host:port or leave it unset"
                )
            if "://" not in a:
                a = f"tcp://{a}"
            object.__setattr__(self, "address", a)
            if self.kind == "local":
                object.__setattr__(self, "kind", "address")
        if self.kind == "address" and self.address is None:
            raise ConfigError(
                "cluster kind 'address' needs the scheduler address, e.g. --scheduler tcp://host:8786"
            )
        if (
            self.address is not None and self.kind == "cuda"
        ):  # the address would be ignored silently
            raise ConfigError(
                f"give either a scheduler address ({self.address!r}) or --cluster cuda (start a dask-cuda "
                "cluster here), not both"
            )
        if self.kind == "address" and (
            self.n_workers is not None or self.recipe is not None or self.memory_limit is not None
        ):
            raise ConfigError(
                f"give either a scheduler address ({self.address!r}) or a cluster to start "
                f"(workers={self.n_workers!r}, recipe={self.recipe!r}, memory_limit={self.memory_limit!r}), not both"
            )
        for name in ("n_workers", "threads_per_worker"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.recipe is not None:
            recipe = load_recipe(self.recipe, self.allow_code)
            _check_recipe_values(
                self.recipe, recipe.get("cluster") or {}
            )  # refused here, before any work
            rkind = recipe.get("kind")
            if rkind in ("local", "cuda") and rkind != self.kind:
                raise ConfigError(
                    f"cluster recipe {self.recipe!r} is for kind={rkind!r} but kind={self.kind!r} was asked "
                    f"for; pass --cluster {rkind} or another recipe"
                )

    def cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for LocalCluster/LocalCUDACluster (recipe values, then explicit ones)."""
        kw: dict[str, Any] = {}
        if self.recipe is not None:
            rec = load_recipe(self.recipe, self.allow_code)
            kw.update(rec.get("cluster") or {})
            if rec.get("worker_env"):
                kw["env"] = {str(k): str(v) for k, v in rec["worker_env"].items()}
            _check_recipe_values(self.recipe, kw)
        if self.n_workers is not None:
            kw["n_workers"] = self.n_workers
        kw.setdefault("threads_per_worker", self.threads_per_worker)
        if self.memory_limit is not None:
            kw["memory_limit"] = self.memory_limit
        if self.kind == "local":
            kw.setdefault("n_workers", DEFAULT_WORKERS)
        return kw

    def check_reachable(self, timeout: float = 5.0) -> None:
        """For ``address``: refuse an unreachable or malformed scheduler before any work starts."""
        if self.kind != "address" or self.address is None:
            return
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(self.address)
        if parts.scheme not in ("tcp", "tls", "ws", "wss", "inproc", "ucx"):
            raise ConfigError(
                f"scheduler address {self.address!r} has an unknown protocol; use tcp://host:port"
            )
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise ConfigError(
                f"scheduler address {self.address!r} is malformed ({exc}); use tcp://host:port"
            ) from None
        if parts.scheme == "inproc":
            return
        if not host or not port:
            raise ConfigError(
                f"scheduler address {self.address!r} needs a host and a port, e.g. tcp://10.0.0.5:8786"
            )
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as exc:
            raise ConfigError(
                f"cannot reach the Dask scheduler at {self.address!r} ({exc.strerror or exc}); start it "
                "(`dask scheduler`) or run without --scheduler to use a local cluster"
            ) from None


def has_gpu_workers(client: Any) -> bool:
    """True when at least one worker of the cluster carries the ``GPU`` resource label."""
    info = client.scheduler_info(n_workers=-1)
    return any(GPU in (w.get("resources") or {}) for w in info.get("workers", {}).values())


@dataclass
class ClusterHandle:
    """A client plus the cluster it owns (closed on exit) and executors for model and other tasks."""

    client: Any
    cluster: Any | None = None
    gpu: bool = False
    _executors: dict[str, Executor] = field(default_factory=dict)

    def model_executor(self) -> Executor:
        """Executor for model tasks: pinned to GPU-labelled workers when there are any."""
        if "model" not in self._executors:
            kw = {"resources": {GPU: 1}} if self.gpu else {}
            self._executors["model"] = self.client.get_executor(pure=False, **kw)
        return self._executors["model"]

    def executor(self) -> Executor:
        """Executor for I/O and blend tasks (any worker)."""
        if "any" not in self._executors:
            self._executors["any"] = self.client.get_executor(pure=False)
        return self._executors["any"]

    def n_workers(self) -> int:
        try:
            return len(self.client.scheduler_info(n_workers=-1).get("workers", {}))
        except Exception:
            return 1

    def describe(self) -> dict[str, Any]:
        """Small description of the cluster for the run record."""
        info = self.client.scheduler_info(n_workers=-1)
        workers = info.get("workers", {})
        return {
            "scheduler": info.get("address"),
            "n_workers": len(workers),
            "threads": sum(int(w.get("nthreads", 0)) for w in workers.values()),
            "gpu_workers": sorted(
                a for a, w in workers.items() if GPU in (w.get("resources") or {})
            ),
            "owned": self.cluster is not None,
            "dashboard": self.dashboard(),
        }

    def dashboard(self) -> str:
        try:
            return str(self.client.dashboard_link)
        except Exception:  # no dashboard on that scheduler
            return "none"

    def close(self) -> None:
        """Close the client (and the cluster when owned); teardown errors are only logged."""
        import logging

        log = logging.getLogger("hyperdeq.cluster")
        for what, obj in (("client", self.client), ("cluster", self.cluster)):
            if obj is None:
                continue
            try:
                obj.close()
            except Exception as exc:  # the run's result does not depend on a clean teardown
                log.warning(
                    "closing the Dask %s raised %s: %s (ignored; the run's outcome stands)",
                    what,
                    type(exc).__name__,
                    exc,
                )

    def __enter__(self) -> ClusterHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def local_torch_threads(n_workers: int, threads_per_worker: int = 1) -> int:
    """Torch threads per worker of a local CPU cluster: the host's cores shared out evenly."""
    return max(1, (os.cpu_count() or 1) // max(1, n_workers * threads_per_worker))


def _start(spec: ClusterSpec, device: str) -> tuple[Any, int]:
    """Start the cluster ``spec`` asks for; returns (cluster, its CPU worker count or 0 for GPUs).

    The recipe's ``worker_env`` reaches the worker processes through distributed's
    ``nanny.pre-spawn-environ`` (set before a worker starts, so thread counts apply; dask-cuda
    replaces a Nanny's ``env`` with its own device list). The flow's own environment wins.
    """
    import dask.config

    kw = spec.cluster_kwargs()
    env = kw.pop("env", None) or {}
    key = "distributed.nanny.pre-spawn-environ"
    with dask.config.set({key: {**(dask.config.get(key, default={}) or {}), **env}}):
        return _construct(spec, device, kw)


def _construct(spec: ClusterSpec, device: str, kw: dict[str, Any]) -> tuple[Any, int]:
    from distributed import LocalCluster

    want_cuda = spec.kind == "cuda" or (device != "cpu" and _cuda_count() > 0)
    if want_cuda:
        kw.pop("n_workers", None)  # one worker per visible GPU
        kw.setdefault("resources", {GPU: 1})
        kw = {k: v for k, v in kw.items() if v is not None}
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            if spec.kind == "cuda":
                raise ConfigError(
                    "cluster kind 'cuda' needs dask-cuda (pip install dask-cuda) and a GPU"
                ) from None
            kw.setdefault("dashboard_address", ":0")
            return LocalCluster(n_workers=1, processes=True, **kw), 0
        return LocalCUDACluster(**kw), 0
    kw.setdefault("dashboard_address", ":0")  # a free port; never clash with 8787
    kw.setdefault("processes", True)
    return LocalCluster(**kw), int(kw["n_workers"])


def open_cluster(
    spec: ClusterSpec, device: str = "cpu", preload: dict[str, Any] | None = None
) -> ClusterHandle:
    """Start or connect to the cluster ``spec`` names; preload models on its workers when asked.

    ``preload``: keyword arguments of :class:`workers.plugin.ModelPlugin` (``models``, ...), from the
    model options (``DenoiseOptions.preload()``); empty or None loads nothing.
    """
    from distributed import Client

    cluster: Any | None = None
    cpu_workers = 0
    try:
        if spec.kind == "address":
            spec.check_reachable()
            client = Client(spec.address, timeout="20s", set_as_default=False)
        else:
            cluster, cpu_workers = _start(spec, device)
            client = Client(cluster, set_as_default=False)
    except ConfigError:
        raise
    except Exception as exc:
        if cluster is not None:
            cluster.close()
        where = spec.address if spec.kind == "address" else f"a {spec.kind} cluster"
        raise ClusterError(
            f"could not start or reach {where} ({type(exc).__name__}: {exc}); check the scheduler / "
            "recipe, then rerun the same command"
        ) from exc
    handle = ClusterHandle(client=client, cluster=cluster, gpu=has_gpu_workers(client))
    if preload and preload.get("models"):
        from workers.plugin import ModelPlugin

        threads = (
            local_torch_threads(cpu_workers, int(spec.threads_per_worker)) if cpu_workers else 1
        )
        client.register_plugin(
            ModelPlugin(
                **preload, device=device, torch_threads=threads, keep_threads=spec.kind == "address"
            ),
            name=ModelPlugin.name,
        )
    return handle
