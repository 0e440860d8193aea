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

    def __init__(
        self,
        models: tuple[str, ...] = ("decsc",),
        device: str = "cpu",
        torch_threads: int | None = 1,
        weights: dict[str, str] | None = None,
        keep_threads: bool = False,
    ) -> None:
        """``torch_threads``: intra-op threads per worker process (None leaves torch's default).

        Use :func:`workers.cluster.local_torch_threads` for a local CPU cluster so the workers share the cores.
        ``weights``: which of a model's shipped weights to preload (model name -> weights name; default:
        the spec's ``default_weights``), e.g. ``{"decsc": "full"}``.
        ``keep_threads``: leave the thread count an earlier hyperdeq plugin set on the worker (a
        client that merely connects to a running cluster -- each scene of a sweep -- must not
        lower what the cluster's owner chose; torch fixes a thread's count at its first parallel
        op, so a later change would only reach new task threads anyway).
        """
        self.models = tuple(models)
        self.weights = dict(weights or {})
        self.device = device
        self.torch_threads = torch_threads
        self.keep_threads = keep_threads
        self.loaded: dict[str, str] = {}

    def setup(self, worker: Any) -> None:
        import importlib

        import torch

        from workers.allocator import tune_allocator
        from workers.infer import get_model, resolve_device
        from workers.registry import get_spec, verified_weights_path

        tune_allocator()
        if self.torch_threads and not (
            self.keep_threads and getattr(worker, "hyperdeq_torch_threads", None)
        ):
            torch.set_num_threads(int(self.torch_threads))
            worker.hyperdeq_torch_threads = int(self.torch_threads)
        dev = resolve_device(self.device)
        for name in self.models:
            spec = get_spec(name)
            key = self.weights.get(name) or spec.default_weights
            ref = spec.weights_ref(key)
            verified_weights_path(spec, key=key)  # raises WeightsError on a missing/tampered file
            if spec.loader:
                module, attr = spec.loader.split(":")
                load = getattr(importlib.import_module(module), attr)
                get_model((name, dev, ref.sha256), partial(load, dev, key))
            self.loaded[name] = ref.sha256
        worker.hyperdeq_models = dict(self.loaded)
