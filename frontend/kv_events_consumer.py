"""Feeds the `KvIndex` from the event plane (docs/ARCHITECTURE.md "Events").

Subscribes to `kvrelay.<namespace>.kv_events` and applies each event. Delivery is at-most-once, so a
worker's events can have holes; when the index reports a gap the consumer asks the worker for a
snapshot (`resync`), buffers that worker's events meanwhile, applies the snapshot and replays the
buffered events newer than it (older ones are stale: the index ignores them). Other workers' events
keep flowing while one worker resyncs.

Invariants:
- A worker is in `_buffers` iff a resync task for it is running (`_resyncs`); while it is, none of
  its events reach the index directly, so they are applied in order after the snapshot.
- The buffer is bounded (oldest dropped): a dropped event is either covered by the snapshot or shows
  up as a gap on replay, which starts another resync.
- A failing resync (an error, or a gap again after the snapshot) is retried with backoff; after
  `max_attempts` the worker's (now untrusted) state is dropped from the index, and its next event
  starts over.
- `remove_worker` (discovery says it left) cancels its resync, drops its buffer and its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import msgspec

from kvrelay.frontend.kv_index import KvIndex
from kvrelay.kvbm.events import KvEvent, KvSnapshot, kv_events_subject
from kvrelay.runtime.events import EventPlane, Subscription

log = logging.getLogger(__name__)

Resync = Callable[[str], Awaitable[KvSnapshot]]


class KvEventsConsumer:
    def __init__(self, event_plane: EventPlane, namespace: str, index: KvIndex, resync: Resync, *,
                 max_buffered: int = 10_000, max_attempts: int = 5, backoff_s: float = 0.1,
                 max_backoff_s: float = 5.0):
        self.event_plane, self.namespace, self.index, self.resync = event_plane, namespace, index, resync
        self.max_buffered, self.max_attempts = max_buffered, max_attempts
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._buffers: dict[str, deque[KvEvent]] = {}
        self._resyncs: dict[str, asyncio.Task[None]] = {}
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self.resyncs_started = 0  # snapshot requests (first tries and retries), for metrics and tests
        self.undecodable = 0

    async def start(self) -> None:
        """Subscribe (live when this returns) and start consuming."""
        await self.event_plane.start()
        self._sub = await self.event_plane.subscribe(kv_events_subject(self.namespace))
        self._task = asyncio.create_task(self._run(self._sub))

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._resyncs.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._resyncs.clear()
        self._buffers.clear()
        if self._sub is not None:
            await self._sub.close()

    @property
    def dropped(self) -> int:
        """Messages the subscription dropped because this consumer fell behind."""
        return self._sub.dropped if self._sub is not None else 0

    def resyncing(self) -> set[str]:
        return set(self._resyncs)

    # -- discovery hooks --------------------------------------------------------------------------------
    def remove_worker(self, worker_id: str) -> None:
        task = self._resyncs.pop(worker_id, None)
        if task is not None:
            task.cancel()
        self._buffers.pop(worker_id, None)
        self.index.remove_worker(worker_id)

    def add_worker(self, worker_id: str) -> None:
        self.index.add_worker(worker_id)

    # -- event path -------------------------------------------------------------------------------------
    async def _run(self, sub: Subscription) -> None:
        async for msg in sub:
            try:
                event = msg.decode(KvEvent)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.undecodable += 1  # if it was a real event, the next one of its worker is a gap
                log.warning("undecodable KV event on %s", msg.subject)
                continue
            try:
                self.handle(event)
            except Exception:  # a bug here must not leave the router blind for good
                log.exception("could not apply KV event %d of %s", event.event_id, event.worker_id)

    def handle(self, event: KvEvent) -> None:
        """Apply one event, or buffer it while its worker resyncs, or start a resync on a gap."""
        w = event.worker_id
        buf = self._buffers.get(w)
        if buf is not None:
            self._buffer(buf, event)
        elif not self.index.apply(event):
            log.info("KV event gap from %s (last %d, got %d); resyncing", w, self.index.last_event_id(w),
                     event.event_id)
            self._buffers[w] = deque([event])
            self.resyncs_started += 1
            self._resyncs[w] = asyncio.create_task(self._resync_worker(w))

    def _buffer(self, buf: deque[KvEvent], event: KvEvent) -> None:
        if len(buf) >= self.max_buffered:
            buf.popleft()
        buf.append(event)

    async def _resync_worker(self, w: str) -> None:
        try:
            attempt = 0
            while True:
                try:
                    snap = await self.resync(w)
                    if snap.worker_id != w:
                        snap = msgspec.structs.replace(snap, worker_id=w)
                    self.index.apply_snapshot(snap)
                    if self._replay(self._buffers[w]):
                        return
                    failure = f"a gap after its snapshot (last event {snap.last_event_id})"
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    failure = repr(e)
                # An event lost during the resync, or a snapshot older than the gap: take another one,
                # with backoff, so a misbehaving worker cannot spin this loop.
                attempt += 1
                if attempt >= self.max_attempts:
                    log.warning("resync of %s failed %d times (%s); dropping its blocks", w, attempt, failure)
                    self.index.remove_worker(w, tombstone=False)
                    return
                self.resyncs_started += 1
                await asyncio.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
        finally:
            # Only this worker's own task may clear its entries (remove_worker already did, and a later
            # resync may have replaced them).
            if self._resyncs.get(w) is asyncio.current_task():
                del self._resyncs[w]
                self._buffers.pop(w, None)

    def _replay(self, buf: deque[KvEvent]) -> bool:
        """Apply buffered events in order; False if one is a gap (it stays first in the buffer)."""
        while buf:
            if not self.index.apply(buf[0]):
                return False
            buf.popleft()
        return True
