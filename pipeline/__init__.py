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

__all__ = [
    "ConfigError",
    "GridError",
    "HyperdeqError",
    "ModelError",
    "ProvenanceError",
    "ReadError",
    "WeightsError",
    "WriteError",
]
