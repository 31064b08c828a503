"""The other frontends' in-flight requests, in this frontend's routers (issue 19).

Several frontend processes (`--http-workers N` behind one port, or frontend replicas behind a load
balancer) route to the same workers. A router counts the requests in flight at decision time
(router.py `InFlight`); to spread a burst across processes, and to count a prompt block shared by
requests of two frontends once, it must hold the others' requests too. So every frontend publishes
what its routers do on `kvrelay.<namespace>.router_sync`: each routed request (router, worker, prompt
block hashes) and each finished one; peers apply them to the same router's `InFlight`, under ids
that cannot collide with their own. The KV index needs no such exchange: every frontend subscribes to
the workers' KV events itself and builds the same index.

- A frontend with no peer (none heard within `stale`) sends only the heartbeats.
- Coalesced: a change wakes the publisher, which sends the operations since the last message at most
  once per `interval` (default 2 ms), so a burst costs a few messages, not one per request.
- Delivery is at-most-once, so every `heartbeat` seconds the full state is sent instead; a peer
  replaces everything it holds from that frontend with it (a lost message heals within a heartbeat).
- A peer silent for `stale` seconds is forgotten (it died) and its requests are released; one that
  closes says so first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence

import msgspec

from kvrelay.frontend.router import FINISHED, FIRST_TOKEN, ROUTED, BaseRouter
from kvrelay.runtime.events import EventPlane, Subscription

log = logging.getLogger(__name__)

ADD, FINISH, FIRST = ROUTED, FINISHED, FIRST_TOKEN


class Op(msgspec.Struct, array_like=True):
    kind: int  # ADD | FINISH | FIRST (the request's first token came: its prefill left the worker's queue)
    router: str  # the router's label (its own name unless given one: kv, decode, prefill, ...)
    request_id: str
    worker_id: str = ""
    hashes: list[int] = []
    partial: int = 0  # the prompt's partial last block (0 or 1)
    prefill: int = 0  # ADD: prompt tokens the router expects the worker to compute before the first token


class RouterSync(msgspec.Struct):
    frontend_id: str
    ops: list[Op]
    full: bool = False  # ops are every request in flight (ADDs only): replace what this frontend held
    leaving: bool = False


def router_sync_subject(namespace: str) -> str:
    return f"kvrelay.{namespace}.router_sync"


class PeerLoad:
    def __init__(self, events: EventPlane, namespace: str, frontend_id: str, routers: Mapping[str, BaseRouter], *,
                 interval: float = 0.002, heartbeat: float = 1.0, stale: float = 3.0):
        """`routers`: label -> router; each router's `sync` is pointed at this object."""
        self.events, self.subject, self.frontend_id = events, router_sync_subject(namespace), frontend_id
        self.routers, self.interval, self.heartbeat, self.stale = dict(routers), interval, heartbeat, stale
        self._pending: list[Op] = []
        self._dirty = asyncio.Event()
        self._held: dict[str, tuple[float, set[tuple[str, str]]]] = {}  # peer -> (last heard, {(router, id)})
        self._sub: Subscription | None = None
        self._tasks: list[asyncio.Task] = []
        self.published = 0
        for label, router in self.routers.items():
            router.sync = self._recorder(label)

    def peers(self) -> list[str]:
        return sorted(self._held)

    def peer_requests(self, label: str) -> int:
        """Peers' requests held in router `label`'s in-flight accounting."""
        return sum(1 for _, held in self._held.values() for r, _ in held if r == label)

    async def start(self) -> None:
        self._sub = await self.events.subscribe(self.subject)
        self._tasks = [asyncio.create_task(self._consume(self._sub)), asyncio.create_task(self._publish_loop())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):  # leaving: our requests go with us
            await self.events.publish(self.subject, RouterSync(self.frontend_id, [], leaving=True))
        if self._sub is not None:
            await self._sub.close()

    # -- publishing -------------------------------------------------------------------------------------
    def _recorder(self, label: str):
        def record(kind: int, request_id: str, worker_id: str = "", hashes: Sequence[int] = (), partial: int = 0,
                   prefill: int = 0) -> None:
            if not self._held:  # no peer heard of: the next full state (each heartbeat) is enough
                return
            if kind == ADD:
                self._pending.append(Op(ADD, label, request_id, worker_id, list(hashes), partial, prefill))
            else:
                self._pending.append(Op(kind, label, request_id))
            self._dirty.set()
        return record

    def _full_state(self) -> list[Op]:
        return [Op(ADD, label, rid, w, hashes, partial, router.inflight.prefill_pending(rid))
                for label, router in self.routers.items()
                for rid, (w, hashes, partial) in router.inflight.entries() if not rid.startswith(_PEER)]

    async def _publish_loop(self) -> None:
        last_full = -self.heartbeat  # the first message is a full state: peers learn of us at once
        while True:
            self._dirty.clear()
            now = time.monotonic()
            full = now - last_full >= self.heartbeat
            ops, self._pending = (self._full_state() if full else self._pending), []
            try:
                await self.events.publish(self.subject, RouterSync(self.frontend_id, ops, full=full))
                self.published += 1
                last_full = now if full else last_full
            except Exception:  # the event plane is down: routing goes on; the next heartbeat retries in full
                log.warning("could not publish router sync", exc_info=True)
                last_full = now
            self._expire()
            await asyncio.sleep(self.interval)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), max(0.0, last_full + self.heartbeat - time.monotonic()))

    # -- receiving --------------------------------------------------------------------------------------
    async def _consume(self, sub: Subscription) -> None:
        async for msg in sub:
            try:
                sync = msg.decode(RouterSync)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if sync.frontend_id != self.frontend_id:
                self._apply(sync)

    def _apply(self, sync: RouterSync) -> None:
        peer = sync.frontend_id
        if sync.leaving:
            self._drop(peer)
            return
        held = self._held.setdefault(peer, (0.0, set()))[1]
        self._held[peer] = (time.monotonic(), held)
        if sync.full:
            keep = {(op.router, op.request_id) for op in sync.ops}
            for label, rid in held - keep:
                self._finish(held, label, rid, peer)
        for op in sync.ops:
            router = self.routers.get(op.router)
            if router is None:
                continue
            pid = f"{_PEER}{peer}/{op.request_id}"
            if op.kind == ADD:
                router.add_peer(pid, op.worker_id, op.hashes, op.partial, op.prefill)
                held.add((op.router, op.request_id))
            elif op.kind == FIRST:
                router.inflight.first_token(pid)
            else:
                self._finish(held, op.router, op.request_id, peer)

    def _finish(self, held: set, label: str, rid: str, peer: str) -> None:
        held.discard((label, rid))
        router = self.routers.get(label)
        if router is not None:
            router.inflight.finish(f"{_PEER}{peer}/{rid}")

    def _drop(self, peer: str) -> None:
        _, held = self._held.pop(peer, (0.0, set()))
        for label, rid in list(held):
            self._finish(held, label, rid, peer)

    def _expire(self) -> None:
        now = time.monotonic()
        for peer in [p for p, (t, _) in self._held.items() if now - t > self.stale]:
            log.info("frontend %s went silent; releasing its %d requests", peer, len(self._held[peer][1]))
            self._drop(peer)


_PEER = "\x00peer:"  # prefix of peer requests' ids in a router's InFlight (never a request id of ours)
