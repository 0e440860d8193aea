"""Dask worker plugin: load each model once per worker (weights hash checked) and keep it.

Register with ``client.register_plugin(ModelPlugin(...))`` (``register_worker_plugin`` is gone
from recent ``distributed``). The models land in :mod:`workers.infer`'s per-process cache, which is
what the tile models use, so tasks on that worker never reload weights.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin


class ModelPlugin(WorkerPlugin):
    """Preload ``models`` (registry names with shipped weights) on every worker at start-up."""

    name = "hyperdeq-models"

    def __init__(self, models: tuple[str, ...] = ("decsc",), device: str = "cpu",
                 torch_threads: int | None = 1, decsc_arch: str = "shipped",
                 keep_threads: bool = False) -> None:
        """``torch_threads``: intra-op threads per worker process (None leaves torch's default).

        Use :func:`workers.cluster.local_torch_threads` for a local CPU cluster so the workers share the cores.
        ``decsc_arch``: which DECSC weights to preload (``shipped`` or ``full``).
        ``keep_threads``: leave the thread count an earlier hyperdeq plugin set on the worker (a
        client that merely connects to a running cluster -- each scene of a sweep -- must not
        lower what the cluster's owner chose; torch fixes a thread's count at its first parallel
        op, so a later change would only reach new task threads anyway).
        """
        self.models = tuple(models)
        self.decsc_arch = decsc_arch
        self.device = device
        self.torch_threads = torch_threads
        self.keep_threads = keep_threads
        self.loaded: dict[str, str] = {}

    def setup(self, worker: Any) -> None:
        import torch

        from workers.infer import get_model, load_decsc, resolve_device
        from workers.registry import get_spec, verified_weights_path

        if self.torch_threads and not (self.keep_threads and getattr(worker, "hyperdeq_torch_threads", None)):
            torch.set_num_threads(int(self.torch_threads))
            worker.hyperdeq_torch_threads = int(self.torch_threads)
        dev = resolve_device(self.device)
        for name in self.models:
            spec = get_spec(name)
            verified_weights_path(spec)  # raises WeightsError on a missing/tampered file
            sha = spec.weights_sha256
            if name == "decsc":
                from workers.denoise.api import arch_weights

                sha = arch_weights(self.decsc_arch)[1]
                get_model(("decsc", dev, sha), partial(load_decsc, dev, self.decsc_arch))
            self.loaded[name] = str(sha)
        worker.hyperdeq_models = dict(self.loaded)
