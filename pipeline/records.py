"""Typed, frozen records with one JSON form each: a tile's record (its commit marker).

Each record is a frozen dataclass with exactly one serialisation pair, ``to_json()`` (a plain
dict, what is written) and ``from_json(d)`` (what is read back); ``from_json(r.to_json()) == r``.
Model-specific figures (solver and band-guard statistics) stay untyped in one read-only ``stats``
mapping (:class:`FrozenMap`). :class:`JsonFields` gives read access by JSON key (``rec["status"]``,
``rec.get("reused")``) to callers written against the plain-dict records.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

OK, FAILED, REUSED = "ok", "failed", "reused"


class FrozenMap(Mapping[str, Any]):
    """A read-only, hashable, picklable mapping (``types.MappingProxyType`` does not pickle)."""

    __slots__ = ("_d",)
    _d: dict[str, Any]

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_d", dict(items or {}))

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._d.items(), key=lambda kv: kv[0])))

    def __eq__(self, other: object) -> bool:
        return dict(self._d) == dict(other) if isinstance(other, Mapping) else NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenMap, (self._d,))


def freeze(value: Any) -> Any:
    """``value`` with its dicts as :class:`FrozenMap` and its lists as tuples, at any depth."""
    if isinstance(value, Mapping):
        return FrozenMap({str(k): freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The JSON form of a :func:`freeze` d value: mappings as dicts, tuples as lists."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [thaw(v) for v in value]
    return value


class JsonFields:
    """Read access by JSON key, through the record's one ``to_json()``."""

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_json()


def _box(v: Any) -> tuple[int, ...] | None:
    return None if v is None else tuple(int(x) for x in v)


@dataclass(frozen=True)
class TileRecord(JsonFields):
    """One tile of a model stage: what ran it, what it read and wrote, and the model's report.

    Written after the tile's data as its commit marker (``tiles/<stage>.records/<key>.json``) and
    listed, projected, in ``run.json`` under ``"tiles"``. ``model`` is None only in the record of
    a task that never reported (lost worker, closed client): such a record has no task fields.
    The model's report (``device``, ``iterations``, ``residual``, ``converged``, ``stats``) is in
    the JSON of ``ok`` tiles only; ``reused`` (a resumed run kept the tile) is never written.
    """

    key: str
    index: tuple[int, ...] = ()
    stage: str = ""
    status: str = FAILED
    # the task that ran the tile
    model: str | None = None
    weights_sha256: str | None = None
    read: tuple[int, ...] | None = None
    core: tuple[int, ...] | None = None
    worker: str | None = None
    wall_s: float | None = None
    # what it read and wrote (sha256 of the tile's input and output)
    input_checksum: str | None = None
    checksum: str | None = None
    # the model's report
    device: str | None = None
    iterations: int | None = None
    residual: float | None = None
    converged: bool | None = None
    stats: Mapping[str, Any] = field(default_factory=FrozenMap)
    # a failure
    error: str | None = None
    traceback: str | None = None
    reused: bool = False

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "index", _box(self.index) or ())
        put(self, "read", _box(self.read))
        put(self, "core", _box(self.core))
        put(self, "stats", freeze(self.stats or {}))
        for k in ("iterations", "residual", "converged"):  # per-sample lists stay immutable
            put(self, k, freeze(getattr(self, k)))
        put(self, "reused", bool(self.reused))

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key,
            "index": list(self.index),
            "stage": self.stage,
            "status": self.status,
        }
        if self.model is not None:
            out.update(
                model=self.model,
                weights_sha256=self.weights_sha256,
                read=thaw(self.read),
                core=thaw(self.core),
                worker=self.worker,
                wall_s=self.wall_s,
            )
        if self.ok:
            out.update(
                device=self.device,
                iterations=thaw(self.iterations),
                residual=thaw(self.residual),
                converged=thaw(self.converged),
                stats=thaw(self.stats),
            )
        for k in ("input_checksum", "checksum", "error", "traceback"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.reused:
            out["reused"] = True
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TileRecord:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
