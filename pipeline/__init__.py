"""hyperdeq data plane: scene model, readers, zarr ingest, tiles, blending, writers, provenance.

This package never imports torch, prefect or distributed.
"""

from pipeline.errors import (
    ConfigError,
    GridError,
    HyperdeqError,
    ModelError,
    ProvenanceError,
    ReadError,
    WeightsError,
    WriteError,
)

#: Dask scheduler for the driver's own small computations (reading a scene window, a tile-validity
#: mask, an unmixer pixel sample). Always passed explicitly: with the default, these would run on
#: whatever ``distributed.Client`` is the process-wide default at that moment -- possibly another
#: scene's client that is closing (a sweep runs scenes concurrently in one process), or a remote
#: cluster whose workers cannot see the driver's files.
LOCAL_SCHEDULER = "threads"

__all__ = [
    "ConfigError",
    "GridError",
    "HyperdeqError",
    "LOCAL_SCHEDULER",
    "ModelError",
    "ProvenanceError",
    "ReadError",
    "WeightsError",
    "WriteError",
]
