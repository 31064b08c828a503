"""`CoreRunner`: what the owner of an `EngineCore` does around each step, the same whether the core
runs on its own thread (thread_driver.py) or on the event loop (loop_driver.py): apply commands from
the asyncio side (commands.py, one `match`), route each output to its request's stream, hand the KV
sources' jobs to their loop halves, and hand KV events on in event_id order.

Invariant: every request whose `Add` succeeded ends with exactly one final item (an output with a
finish reason, a `PrefillResult`, or an exception) on its stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kvrelay.kvbm.events import KvEvent
from kvrelay.workers.api.errors import EngineError
from kvrelay.workers.api.messages import EngineOutput
from kvrelay.workers.api.prefill import PREFILLED, PrefillResult
from kvrelay.workers.core.commands import (
    Abort,
    Add,
    Command,
    KvAnswered,
    KvLoaded,
    KvSaved,
    KvTierEvents,
    Lease,
    LeaseFilled,
    LeaseGrow,
    Snapshot,
    Wake,
)
from kvrelay.workers.core.engine_core import EngineCore
from kvrelay.workers.core.lease_waits import LeaseWaits
from kvrelay.workers.core.streams import Item, Stream, resolve

log = logging.getLogger(__name__)
Deliveries = list[tuple[Stream, Item]]


class CoreRunner:
    def __init__(self, core: EngineCore, publish: Callable[[list[KvEvent]], None],
                 submit: Callable[[list[Any]], None]):
        """`publish`: hands KV events to the sink; `submit`: hands KV-source jobs to their loop halves."""
        self.core, self.publish, self.submit = core, publish, submit
        self.streams: dict[str, Stream] = {}  # owner only
        self.lends = LeaseWaits(core)  # peers' leases, some waiting for a prefill in progress here

    def command(self, cmd: Command, deliveries: Deliveries) -> None:
        core = self.core
        match cmd:
            case Add(request=request, stream=stream, hold=hold, hints=hints):
                try:
                    core.add_request(request, hold, hints)
                except EngineError as e:
                    deliveries.append((stream, e))
                else:
                    self.streams[request.request_id] = stream
            case Abort(request_id=rid):
                if self.lends.cancel(rid):
                    return
                out = core.abort(rid)
                target = self.streams.pop(rid, None)
                if out is not None and target is not None:
                    deliveries.append((target, out))
                self.lends.settle()  # a lease may have waited for this request's prefill
            case KvLoaded(request_id=rid, ok=ok):
                core.kv_loaded(rid, ok)
            case KvAnswered(source=source, request_id=rid, answer=answer):
                core.kv_answered(source, rid, answer)
            case KvSaved(source=source, block_ids=block_ids):
                core.kv_saved(source, block_ids)
            case KvTierEvents(tier=tier, kind=kind, hashes=hashes):
                core.kv.events.tier_event(tier, kind, hashes)
            case Lease() as lease:
                self.lends.ask(lease)
            case LeaseGrow(lease_id=lease_id, n=n, future=fut):
                fut.get_loop().call_soon_threadsafe(resolve, fut, core.leases.grow(lease_id, n))
            case LeaseFilled(lease_id=lease_id, hashes=hashes, ok=ok, future=fut):
                fut.get_loop().call_soon_threadsafe(resolve, fut, core.leases.filled(lease_id, hashes, ok))
            case Snapshot(future=fut):
                self.publish_events()  # events up to the snapshot reach the sink first
                snap = core.kv_snapshot()
                fut.get_loop().call_soon_threadsafe(resolve, fut, snap)
            case Wake():
                self.lends.settle()  # a lease's bound may have passed while a step ran

    def route(self, outputs: list[EngineOutput], deliveries: Deliveries) -> None:
        """A step's outputs to their streams; a prefill that parked becomes its `PrefillResult`; a
        request whose sampling failed ends with an error (one request's bad row never fails another)."""
        for rid in self.core.take_failed():
            target = self.streams.pop(rid, None)
            if target is not None:
                deliveries.append((target, EngineError("sampling failed for this request's parameters")))
        for out in outputs:
            target = self.streams.get(out.request_id)
            if target is None:
                continue
            item: Item = out
            if out.finish_reason == PREFILLED:
                out.finish_reason = None
                item = PrefillResult(out, self.core.held_block_ids(out.request_id))
            deliveries.append((target, item))
            if out.finish_reason is not None or item is not out:
                del self.streams[out.request_id]
        self.lends.settle()  # a prefill a peer's lease waits for may have computed its blocks

    def fail_all(self, error: Exception, deliveries: Deliveries) -> None:
        """End every request with `error` (an engine bug, or shutdown) and free its blocks."""
        self.lends.cancel_all()
        for rid in list(self.core.seqs):
            self.core.abort(rid)
        deliveries.extend((s, error) for s in self.streams.values())
        self.streams.clear()

    def flush_jobs(self) -> None:
        """Hand the KV sources' new jobs (loads, lookups, saves of pinned blocks) to their loop halves."""
        jobs = self.core.door.take_jobs()
        if jobs:
            self.submit(jobs)

    def publish_events(self) -> None:
        events = self.core.drain_kv_events()
        if events:
            self.publish(events)

    def step_failed(self, e: Exception, deliveries: Deliveries) -> None:
        log.exception("engine step failed; failing every in-flight request")
        self.fail_all(EngineError(f"engine failure: {e}"), deliveries)
