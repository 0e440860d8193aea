"""Per-tile progress from Dask workers: each committed tile is logged as a Dask event on a topic
named for the stage's destination store; the client subscribes to it (``Client.subscribe_topic``;
``distributed`` 2026 has no ``Pub``/``Sub`` any more) and hands each tile to ``pipeline.runner.run_tiles``.

Only ``workers/`` imports ``distributed``; ``pipeline/`` sees a :class:`pipeline.runner.TileFeed`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.records import TileRecord


def topic_for(dest: Any) -> str:
    """The event topic of a stage writing into tile store ``dest``."""
    return f"hyperdeq-tiles:{dest}"


@dataclass(frozen=True)
class PublishTile:
    """Runs in the task on a Dask worker: log the committed tile's key and status on ``topic``."""

    topic: str

    def __call__(self, rec: TileRecord) -> None:
        from distributed import get_worker

        try:
            worker = get_worker()
        except ValueError:  # not on a Dask worker (the same job run in-process): nothing to publish
            return
        worker.log_event(self.topic, {"key": str(rec.key), "status": str(rec.status)})


class DaskTileFeed:
    """A :class:`pipeline.runner.TileFeed` over a ``distributed.Client``'s event topics."""

    def __init__(self, client: Any, dest: Any) -> None:
        self.client, self.topic = client, topic_for(dest)
        self._open = False

    def open(self, put: Callable[[TileRecord], None]) -> Callable[[TileRecord], None] | None:
        try:  # the handler runs on the client's event loop: it only enqueues
            self.client.subscribe_topic(
                self.topic, lambda event: put(TileRecord.from_json(dict(event[1])))
            )
        except Exception:  # no per-tile progress then; batches still report
            return None
        self._open = True
        return PublishTile(self.topic)

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self.client.unsubscribe_topic(self.topic)
            except Exception:
                pass


def feed_for(client: Any, executor: Any, dest: Any) -> DaskTileFeed | None:
    """A Dask feed when ``executor`` submits to ``client``'s cluster, else None (the runner's default)."""
    if (
        client is None
        or not hasattr(client, "subscribe_topic")
        or getattr(executor, "_client", None) is not client
    ):
        return None
    return DaskTileFeed(client, dest)
