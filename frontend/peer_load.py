"""What the other frontends sharing this deployment have in flight on each worker (issue 19).

Several frontend processes (`--http-workers N` behind one port, or frontend replicas behind a load
balancer) route to the same workers. Each router counts its own in-flight requests at decision time
(router.py); to spread a burst across processes it must also count the others'. Each frontend
publishes its per-worker in-flight counts on `kvrelay.<namespace>.router_load` and keeps the latest
from every peer; the router adds the peers' sum to its own counts. The KV index needs no such
exchange: every frontend subscribes to the workers' KV events itself and builds the same index.

- Publishing is coalesced: a change wakes the publisher, which sends at most one message per
  `interval` (default 5 ms), so a burst costs a few messages, not one per request. A heartbeat every
  `heartbeat` seconds re-sends the state (a new peer learns it; delivery is at-most-once).
- A peer silent for `stale` seconds is forgotten (it died); one that closes publishes an empty state
  first, so its load disappears at once.
- Blocks are summed across frontends: a prompt block shared by requests of two frontends on one
  worker counts twice (each frontend dedupes only its own), an overestimate of at most the shared part.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import msgspec

from kvrelay.runtime.events import EventPlane, Subscription

log = logging.getLogger(__name__)

Counts = dict[str, tuple[int, int]]  # worker id -> (requests, distinct prompt blocks)


class RouterLoad(msgspec.Struct, frozen=True):
    frontend_id: str
    workers: Counts


def router_load_subject(namespace: str) -> str:
    return f"kvrelay.{namespace}.router_load"


class PeerLoad:
    def __init__(self, events: EventPlane, namespace: str, frontend_id: str, snapshot: Callable[[], Counts], *,
                 interval: float = 0.005, heartbeat: float = 1.0, stale: float = 3.0):
        """`snapshot()`: this frontend's own in-flight counts per worker (what gets published)."""
        self.events, self.subject, self.frontend_id = events, router_load_subject(namespace), frontend_id
        self.snapshot, self.interval, self.heartbeat, self.stale = snapshot, interval, heartbeat, stale
        self._peers: dict[str, tuple[float, Counts]] = {}  # frontend id -> (monotonic receive time, counts)
        self._sum: Counts = {}
        self._dirty = asyncio.Event()
        self._sub: Subscription | None = None
        self._tasks: list[asyncio.Task] = []
        self.published = 0

    def get(self, worker_id: str) -> tuple[int, int]:
        """The other frontends' (requests, blocks) in flight on this worker."""
        return self._sum.get(worker_id, (0, 0))

    def peers(self) -> list[str]:
        return sorted(self._peers)

    def changed(self) -> None:
        """This frontend's counts changed (a request routed or finished): publish soon."""
        self._dirty.set()

    async def start(self) -> None:
        self._sub = await self.events.subscribe(self.subject)
        self._tasks = [asyncio.create_task(self._consume(self._sub)), asyncio.create_task(self._publish_loop())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):  # leaving: our load goes with us
            await self.events.publish(self.subject, RouterLoad(self.frontend_id, {}))
        if self._sub is not None:
            await self._sub.close()

    # -- internals --------------------------------------------------------------------------------------
    async def _publish_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.heartbeat)
            self._dirty.clear()
            try:
                await self.events.publish(self.subject, RouterLoad(self.frontend_id, self.snapshot()))
                self.published += 1
            except Exception:  # the event plane is down: routing goes on with own counts only
                log.warning("could not publish router load", exc_info=True)
            self._expire()
            await asyncio.sleep(self.interval)

    async def _consume(self, sub: Subscription) -> None:
        async for msg in sub:
            try:
                load = msg.decode(RouterLoad)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if load.frontend_id == self.frontend_id:
                continue
            if load.workers:
                self._peers[load.frontend_id] = (time.monotonic(), load.workers)
            else:
                self._peers.pop(load.frontend_id, None)
            self._resum()

    def _expire(self) -> None:
        now = time.monotonic()
        gone = [f for f, (t, _) in self._peers.items() if now - t > self.stale]
        for f in gone:
            del self._peers[f]
        if gone:
            self._resum()

    def _resum(self) -> None:
        total: dict[str, list[int]] = {}
        for _, counts in self._peers.values():
            for w, (reqs, blocks) in counts.items():
                acc = total.setdefault(w, [0, 0])
                acc[0] += reqs
                acc[1] += blocks
        self._sum = {w: (r, b) for w, (r, b) in total.items()}
