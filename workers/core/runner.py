"""`CoreRunner`: what the owner of an `EngineCore` does around each step, the same whether the core
runs on its own thread (thread_driver.py) or on the event loop (loop_driver.py): apply commands from
the asyncio side, route each output to its request's stream, run the lower tiers' bookkeeping, and
hand KV events on in event_id order.

Commands (`post(cmd, arg, extra)`): add, abort, pulled, onboarded, offloaded, replan, tier_event,
snapshot. Invariant: every request whose `add` succeeded ends with exactly one final item (an output
with a finish reason, a `PrefillResult`, or an exception) on its stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvrelay.kvbm.events import KvEvent
from kvrelay.workers.api.messages import EngineOutput
from kvrelay.workers.core.commands import Command
from kvrelay.workers.core.engine_core import EngineCore
from kvrelay.workers.core.errors import EngineError
from kvrelay.workers.core.sequence import PREFILLED
from kvrelay.workers.core.streams import Item, Stream, resolve
from kvrelay.workers.protocol import PrefillResult

if TYPE_CHECKING:  # tier_link imports torch; an engine without tiers (the mocker) never loads it
    from kvrelay.workers.core.tier_link import TierLink

log = logging.getLogger(__name__)
Deliveries = list[tuple[Stream, Item]]


class CoreRunner:
    def __init__(self, core: EngineCore, publish: Callable[[list[KvEvent]], None]):
        self.core, self.publish = core, publish
        self.streams: dict[str, Stream] = {}  # owner only
        self.tiers: TierLink | None = None

    def command(self, cmd: str, arg: Any, extra: Any, deliveries: Deliveries) -> None:
        core = self.core
        if cmd == Command.ADD:
            request, hold, in_lower = arg
            try:
                plan = core.add_request(request, hold, in_lower)
            except EngineError as e:
                deliveries.append((extra, e))
            else:
                self.streams[request.request_id] = extra
                if plan is not None:
                    deliveries.append((extra, plan))
        elif cmd == Command.ABORT:
            out = core.abort(arg)
            target = self.streams.pop(arg, None)
            if out is not None and target is not None:
                deliveries.append((target, out))
        elif cmd == Command.PULLED:
            plan, ok = extra
            core.pulled(arg, plan, ok)
        elif cmd == Command.ONBOARDED:
            ticket, got = extra
            core.onboarded(arg, ticket, got)
        elif cmd == Command.OFFLOADED:
            core.offloaded(arg)
        elif cmd == Command.REPLAN:  # a parked preempted request's lookup answered
            core.replan(arg, extra)
        elif cmd == Command.TIER_EVENT:
            core.kv.events.tier_event(*arg)
        elif cmd == Command.SNAPSHOT:
            self.publish_events()  # events up to the snapshot reach the sink first
            snap = core.kv_snapshot()
            arg.get_loop().call_soon_threadsafe(resolve, arg, snap)

    def route(self, outputs: list[EngineOutput], deliveries: Deliveries) -> None:
        """A step's outputs to their streams; a prefill that parked becomes its `PrefillResult`."""
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

    def fail_all(self, error: Exception, deliveries: Deliveries) -> None:
        """End every request with `error` (an engine bug, or shutdown) and free its blocks."""
        for rid in list(self.core.seqs):
            self.core.abort(rid)
        deliveries.extend((s, error) for s in self.streams.values())
        self.streams.clear()

    def before_step(self) -> None:
        if self.tiers is not None:
            self.tiers.flush_offload()

    def after_step(self, deliveries: Deliveries) -> None:
        """Lower tiers: offload what the step made evictable, look parked requests up, and hand the
        loads planned for preempted requests to their streams."""
        if self.tiers is None:
            return
        core = self.core
        self.tiers.flush_offload()
        self.tiers.relookup(core.take_lookups())
        for rid, ticket in core.take_tickets():
            target = self.streams.get(rid)
            if target is not None:
                deliveries.append((target, ticket))
            else:  # nobody to run the load: unwind it as all-missed
                core.onboarded(rid, ticket, [False] * len(ticket.plan.hashes))

    def publish_events(self) -> None:
        events = self.core.drain_kv_events()
        if events:
            self.publish(events)

    def step_failed(self, e: Exception, deliveries: Deliveries) -> None:
        log.exception("engine step failed; failing every in-flight request")
        self.fail_all(EngineError(f"engine failure: {e}"), deliveries)

