"""The mocker's KV event stream (DESIGN.md "Events"), numbered here so snapshots and events agree.

Invariant: after `flush()`, the events handed to the sink, applied in order (stored adds, removed
drops), give exactly the pool's cached hashes; `last_event_id` counts every event ever emitted.
"""

from __future__ import annotations

from collections.abc import Callable

from kvrelay.kvbm.events import KvEvent


class KvEventLog:
    def __init__(self) -> None:
        self.last_event_id = 0
        self.sink: Callable[[list[KvEvent]], None] | None = None  # events before a sink exists are dropped
        self._pending: list[KvEvent] = []

    def _emit(self, kind: str, hashes: list[int], parent: int | None = None) -> None:
        self.last_event_id += 1
        self._pending.append(KvEvent(worker_id="", event_id=self.last_event_id, kind=kind, tier="G1",
                                     seq_hashes=hashes, parent_hash=parent))

    def stored(self, hashes: list[int], parent: int | None) -> None:
        """`Scheduler(on_stored=...)`: a run of newly cached blocks and the hash before it."""
        self._emit("stored", hashes, parent)

    def removed(self, hashes: list[int]) -> None:
        """`BlockPool(on_evict=...)`: cached blocks reused for new content."""
        self._emit("removed", hashes)

    def flush(self) -> None:
        events, self._pending = self._pending, []
        if events and self.sink is not None:
            self.sink(events)
