"""Get a Dask cluster and the executors the pipeline runs on.

* ``scheduler`` given: connect to that scheduler (its workers are whatever was started there).
* CUDA present and ``device`` asks for it: ``dask_cuda.LocalCUDACluster`` (one worker per GPU),
  each worker labelled ``resources={"GPU": 1}``.
* otherwise: a ``LocalCluster`` of N single-threaded CPU worker processes.

Model tasks are submitted with ``resources={"GPU": 1}`` only when some worker carries that label
(otherwise they would wait forever); blend and I/O tasks go anywhere.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from distributed import Client, LocalCluster

from pipeline.errors import ConfigError

GPU = "GPU"


def has_gpu_workers(client: Client) -> bool:
    """True when at least one worker of the cluster carries the ``GPU`` resource label."""
    info = client.scheduler_info(n_workers=-1)
    return any(GPU in (w.get("resources") or {}) for w in info.get("workers", {}).values())


@dataclass
class ClusterHandle:
    """A client plus the cluster it owns (closed on exit) and executors for model and other tasks."""

    client: Client
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

    def describe(self) -> dict[str, Any]:
        """Small description of the cluster for the run record."""
        info = self.client.scheduler_info(n_workers=-1)
        workers = info.get("workers", {})
        return {
            "scheduler": info.get("address"),
            "n_workers": len(workers),
            "threads": sum(int(w.get("nthreads", 0)) for w in workers.values()),
            "gpu_workers": sorted(a for a, w in workers.items() if GPU in (w.get("resources") or {})),
            "owned": self.cluster is not None,
        }

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

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


def get_cluster(
    workers: int | None = None,
    scheduler: str | None = None,
    *,
    device: str = "cpu",
    threads_per_worker: int = 1,
    processes: bool = True,
    preload: tuple[str, ...] = (),
    memory_limit: str | float | None = "auto",
    decsc_arch: str = "shipped",
) -> ClusterHandle:
    """Connect to ``scheduler`` or start a local (CUDA when asked and present) cluster.

    ``preload``: registry model names to load once per worker through :class:`ModelPlugin`.
    """
    if workers is not None and scheduler is not None:
        raise ConfigError(f"give either workers={workers!r} or scheduler={scheduler!r}, not both")
    cluster: Any | None = None
    n_gpu = 0
    if scheduler is not None:
        client = Client(scheduler, timeout="20s", set_as_default=False)
    else:
        n_gpu = _cuda_count() if device != "cpu" else 0
        if n_gpu:
            try:
                from dask_cuda import LocalCUDACluster

                cluster = LocalCUDACluster(resources={GPU: 1}, threads_per_worker=threads_per_worker)
            except ImportError:
                cluster = LocalCluster(
                    n_workers=1, threads_per_worker=threads_per_worker, processes=processes,
                    resources={GPU: 1}, dashboard_address=None,
                )
        else:
            cluster = LocalCluster(
                n_workers=workers or 2, threads_per_worker=threads_per_worker, processes=processes,
                dashboard_address=None, memory_limit=memory_limit,
            )
        client = Client(cluster, set_as_default=False)
    handle = ClusterHandle(client=client, cluster=cluster, gpu=has_gpu_workers(client))
    if preload:
        from workers.plugin import ModelPlugin, local_torch_threads

        threads = 1
        if cluster is not None and not n_gpu:
            threads = local_torch_threads(workers or 2, threads_per_worker)
        client.register_plugin(ModelPlugin(models=preload, device=device, torch_threads=threads,
                                           decsc_arch=decsc_arch, keep_threads=scheduler is not None),
                               name=ModelPlugin.name)
    return handle
