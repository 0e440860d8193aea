"""Per-chunk checksums of every zarr store hyperdeq writes, and their verification on read.

Each data array is written with zarr v3's ``crc32c`` codec as its last bytes-to-bytes codec: the
checksum of the encoded chunk is stored with it and checked when the chunk is read. Missing and
truncated chunks were already caught (completeness records, decode errors); a flipped bit inside
a compressed frame can decode without complaint into wrong values, and the checksum is what
catches it. A mismatch becomes a :class:`ChunkChecksumError` (a :class:`ReadError`) naming the
store, the array and the chunk, and saying what to do.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ReadError


class ChunkChecksumError(ReadError):
    """A chunk's bytes on disk no longer match the crc32c checksum written with them."""


def checksum_codec() -> Any:
    """The bytes-to-bytes codec that stores and verifies a crc32c checksum per chunk."""
    from zarr.codecs import Crc32cCodec

    return Crc32cCodec()


def compressors(*codecs: Any) -> list[Any]:
    """``codecs`` (zstd level 0, zarr's default, when none) followed by the checksum codec."""
    from zarr.codecs import ZstdCodec

    return [*(codecs or (ZstdCodec(level=0),)), checksum_codec()]


def is_checksum_error(exc: BaseException) -> bool:
    """True for zarr's crc32c mismatch (a ``ValueError`` from the codec)."""
    return isinstance(exc, ValueError) and "checksum do not match" in str(exc)


def _chunk_slices(arr: Any, key: tuple[slice, ...]) -> list[tuple[int, ...]]:
    """Chunk grid indexes touched by the basic-slice selection ``key``."""
    idx = []
    for n, c, k in zip(arr.shape, arr.chunks, key, strict=False):
        start, stop, _ = k.indices(n) if isinstance(k, slice) else (int(k), int(k) + 1, 1)
        idx.append(range(start // c, max(start, stop - 1) // c + 1))
    for n, c in list(zip(arr.shape, arr.chunks, strict=True))[len(key) :]:
        idx.append(range(-(-n // c)))
    return list(itertools.product(*idx))


def bad_chunk(arr: Any, key: Any = ...) -> tuple[tuple[int, ...], str] | None:
    """The first chunk of ``arr`` (touched by ``key``) that fails its checksum, with zarr's message."""
    if key is Ellipsis:
        key = ()
    key = key if isinstance(key, tuple) else (key,)
    for cidx in _chunk_slices(arr, key):
        sel = tuple(
            slice(i * c, min((i + 1) * c, n))
            for i, c, n in zip(cidx, arr.chunks, arr.shape, strict=True)
        )
        try:
            arr[sel]
        except ValueError as exc:
            if is_checksum_error(exc):
                return cidx, str(exc)
    return None


def checksum_error(
    store: str | Path, array: str, arr: Any, chunk: tuple[int, ...], detail: str, fix: str
) -> ChunkChecksumError:
    """The error for a chunk of ``array`` in ``store`` whose checksum does not match."""
    ranges = ", ".join(
        f"{i * c}:{min((i + 1) * c, n)}"
        for i, c, n in zip(chunk, arr.chunks, arr.shape, strict=True)
    )
    key = arr.metadata.encode_chunk_key(chunk) if hasattr(arr, "metadata") else str(chunk)
    return ChunkChecksumError(
        f"chunk {key!r} (index {tuple(int(i) for i in chunk)!r}, elements [{ranges}]) of array "
        f"{array!r} in zarr store {str(store)!r} fails its crc32c checksum ({detail}): its bytes "
        f"changed on disk after it was written (bit rot, a faulty copy or an edit); {fix}"
    )


def read_checked(arr: Any, key: Any, *, store: str | Path, array: str, fix: str) -> np.ndarray:
    """``arr[key]`` as numpy; a checksum mismatch raises :class:`ChunkChecksumError` naming the chunk."""
    try:
        return np.asarray(arr[key])
    except ValueError as exc:
        if not is_checksum_error(exc):
            raise
        found = bad_chunk(arr, key)
        if found is None:  # pragma: no cover - the mismatch did not repeat
            raise ChunkChecksumError(
                f"array {array!r} in zarr store {str(store)!r} fails a crc32c checksum ({exc}); {fix}"
            ) from exc
        raise checksum_error(store, array, arr, found[0], found[1], fix) from exc
