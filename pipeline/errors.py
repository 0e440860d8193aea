"""One error hierarchy for hyperdeq.

Every message says what failed, shows the offending value with ``!r`` and says what to do.
Tests assert on message fragments, so keep wording stable.
"""

from __future__ import annotations


class HyperdeqError(Exception):
    """Root of every error hyperdeq raises on purpose."""


class ConfigError(HyperdeqError, ValueError):
    """Contradictory or nonsensical options (rejected at construction time)."""


class ReadError(HyperdeqError):
    """An input scene cannot be read: missing, unknown format, corrupt, truncated, inconsistent."""


class UnknownFormatError(ReadError):
    """No reader recognises the input."""


class InputValidationError(ReadError, ValueError):
    """The input was read but its content is unusable (zero size, 1 band, all nodata, NaN...)."""


class GridError(HyperdeqError, ValueError):
    """Tile grid geometry is impossible (halo >= tile, negative sizes, ...)."""


class ModelError(HyperdeqError):
    """A model cannot be used: unknown name, incompatible band count, did not converge."""


class WeightsError(ModelError):
    """A weights file is missing, tampered (sha256 mismatch) or belongs to another model."""


class WriteError(HyperdeqError, OSError):
    """An output cannot be written: destination exists, not writable, disk full."""


class ProvenanceError(HyperdeqError):
    """A run record is missing, corrupt or inconsistent with the outputs."""


class ClusterError(HyperdeqError):
    """The Dask cluster went away mid-run: scheduler lost, client disconnected, tasks cancelled.

    Nothing is wrong with the input or the tiles: finished tiles are kept (their records are
    committed), the run record says ``failed``, and rerunning the same command against a live
    scheduler (or a new local cluster) resumes.
    """
