"""`NativeEngine`: the asyncio face of the native engine (implements `workers.protocol.Engine`).

One dedicated thread owns the `LLMEngine` and runs steps back to back while there is work; torch
releases the GIL inside kernels, so the event loop stays responsive. The loop and the thread talk only
through a thread-safe inbox (add/abort commands) and `call_soon_threadsafe` deliveries of each step's
outputs, batched into one callback per step.

Invariant: every request handed to the thread ends with exactly one final output or one exception
delivered to its stream; a stream whose consumer leaves early sends an abort, so its blocks are freed.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from kvrelay.kvbm.events import KvEvent, KvSnapshot
from kvrelay.workers.engines.handoff import PullPlan
from kvrelay.workers.engines.native.llm_engine import LLMEngine, NativeEngineConfig
from kvrelay.workers.engines.native.streams import Item, Stream, deliver, resolve
from kvrelay.workers.engines.native.tier_link import TierLink
from kvrelay.workers.engines.onboard import OnboardTicket
from kvrelay.workers.protocol import (
    PREFILLED,
    EngineError,
    EngineOutput,
    EngineRequest,
    EngineStats,
    KvLayout,
    KvPuller,
    PrefillResult,
)

log = logging.getLogger(__name__)


class NativeEngine:
    def __init__(self, cfg: NativeEngineConfig):
        self.cfg = cfg
        self.core: LLMEngine | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._streams: dict[str, Stream] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stats: EngineStats | None = None
        self._kv_sink: tuple[asyncio.AbstractEventLoop, Callable[[list[KvEvent]], None]] | None = None
        self._puller: KvPuller | None = None
        self.tiers: TierLink | None = None  # G2/G3/G4, when configured and any opened

    async def start(self) -> None:
        if self._thread is not None:
            return
        self.core = await asyncio.to_thread(LLMEngine, self.cfg)
        if self.cfg.tiers is not None and self.cfg.tiers.any:
            self.tiers = await TierLink.open(self.cfg.tiers, self.core, self._post)
        self._stats = self.core.stats()
        self._thread = threading.Thread(target=self._run, name="kvrelay-native-engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        if self._thread is None:
            return
        if self.tiers is not None:
            await self.tiers.drain()  # copies in flight finish (and unpin) before the thread stops
        self._stop.set()
        self._inbox.put(("wake", None, None))
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        if self.tiers is not None:
            await self.tiers.close()

    # -- Engine protocol --------------------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self._thread is None:
            raise EngineError("engine is not running")
        if request.kv_handle is not None and self._puller is None:
            raise EngineError("this worker cannot take a KV handle (no transfer engine)")
        in_lower = await self.tiers.lookup(request) if self.tiers is not None and request.kv_handle is None else None
        stream = Stream(asyncio.get_running_loop())
        self._inbox.put(("add", (request, False, in_lower), stream))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                if isinstance(item, (PullPlan, OnboardTicket)):
                    await self._load(request, item)
                    continue
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._inbox.put(("abort", request.request_id, None))

    async def _load(self, request: EngineRequest, item: PullPlan | OnboardTicket) -> None:
        """Fill the blocks the engine allocated (pull from a prefill worker, or onboard from tiers) and
        report to the engine thread, always: until it hears back it keeps those blocks out of reach."""
        if isinstance(item, PullPlan):
            assert self._puller is not None and request.kv_handle is not None
            try:  # a cancelled pull returns only once the transport stopped writing the blocks
                ok = await self._puller.pull(request.kv_handle, item.local_block_ids, item.start)
            except BaseException:
                self._inbox.put(("pulled", request.request_id, (item, False)))
                raise
            self._inbox.put(("pulled", request.request_id, (item, ok)))
            return
        assert self.tiers is not None
        await self.tiers.onboard(request.request_id, item)

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))

    async def prefill(self, request: EngineRequest) -> PrefillResult:
        if self._thread is None:
            raise EngineError("engine is not running")
        in_lower = await self.tiers.lookup(request) if self.tiers is not None else None
        stream = Stream(asyncio.get_running_loop())
        self._inbox.put(("add", (request, True, in_lower), stream))
        done = False
        try:
            item = await stream.queue.get()
            if isinstance(item, OnboardTicket):
                await self._load(request, item)
                item = await stream.queue.get()
            done = True
            if isinstance(item, Exception):
                raise item
            if isinstance(item, PrefillResult):
                return item
            assert isinstance(item, EngineOutput) and item.finish_reason is not None
            return PrefillResult(item, [])  # the first token ended it (stop, max_tokens=1): nothing held
        finally:
            if not done:  # cancelled mid-prefill: free its blocks
                self._inbox.put(("abort", request.request_id, None))

    def set_kv_puller(self, puller: KvPuller) -> None:
        self._puller = puller

    def kv_pool(self) -> Any:
        assert self.core is not None, "start() first"
        return self.core.kv_cache

    def _post(self, cmd: str, arg: Any, extra: Any) -> None:
        self._inbox.put((cmd, arg, extra))

    def subscribe_kv_events(self, sink: Callable[[list[KvEvent]], None]) -> None:
        """`sink` is called on the current event loop with each step's KV events, in event_id order."""
        self._kv_sink = (asyncio.get_running_loop(), sink)

    async def kv_snapshot(self) -> KvSnapshot:
        """What G1 holds, consistent with the event stream: every event with id <= last_event_id was
        handed to the sink before this returns."""
        fut = asyncio.get_running_loop().create_future()
        self._inbox.put(("snapshot", fut, None))
        return await fut

    @property
    def fingerprint(self) -> str:
        assert self.core is not None, "start() first"
        return self.core.fingerprint

    @property
    def max_model_len(self) -> int:
        assert self.core is not None, "start() first"
        return self.core.max_model_len

    def kv_layout(self) -> KvLayout:
        assert self.core is not None, "start() first"
        return self.core.kv_layout()

    def stats(self) -> EngineStats:
        assert self._stats is not None, "start() first"
        if self.tiers is None:
            return self._stats
        return msgspec.structs.replace(self._stats, tiers=self.tiers.counters())

    # -- engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        core = self.core
        assert core is not None
        while not self._stop.is_set():
            deliveries: list[tuple[Stream, Item]] = []
            block = not core.has_work()
            while True:
                try:
                    cmd, arg, stream = self._inbox.get(block=block, timeout=0.5 if block else None)
                except queue.Empty:
                    break
                block = False
                self._command(core, cmd, arg, stream, deliveries)
            if self.tiers is not None:
                self.tiers.flush_offload()
            if core.has_work():
                try:
                    outputs = core.step()
                except Exception as e:  # never leave a request hanging on an engine bug
                    log.exception("engine step failed; failing every in-flight request")
                    outputs = []
                    for rid in list(core.seqs):
                        core.abort(rid)
                        target = self._streams.pop(rid, None)
                        if target is not None:
                            deliveries.append((target, EngineError(f"engine failure: {e}")))
                for rid in core.take_failed():  # one request's bad row never fails its neighbours
                    target = self._streams.pop(rid, None)
                    if target is not None:
                        deliveries.append((target, EngineError("sampling failed for this request's parameters")))
                for out in outputs:
                    target = self._streams.get(out.request_id)
                    if target is not None:
                        item: Item = out
                        if out.finish_reason == PREFILLED:
                            out.finish_reason = None
                            item = PrefillResult(out, core.held_block_ids(out.request_id))
                        deliveries.append((target, item))
                        if out.finish_reason is not None or item is not out:
                            del self._streams[out.request_id]
            if self.tiers is not None:
                self.tiers.flush_offload()
                self.tiers.relookup(core.take_lookups())
                for rid, ticket in core.take_tickets():  # preempted requests loading back
                    target = self._streams.get(rid)
                    if target is not None:
                        deliveries.append((target, ticket))
                    else:  # nobody to run the load: unwind it as all-missed
                        core.onboarded(rid, ticket, [False] * len(ticket.plan.hashes))
            self._stats = core.stats()
            self._publish_kv_events(core)
            deliver(deliveries)
        for rid in list(core.seqs):
            core.abort(rid)
        deliver([(s, EngineError("engine shut down")) for s in self._streams.values()])
        self._streams.clear()

    def _command(self, core: LLMEngine, cmd: str, arg: Any, stream: Any,
                 deliveries: list[tuple[Stream, Item]]) -> None:
        if cmd == "add":
            request, hold, in_lower = arg
            try:
                plan = core.add_request(request, hold, in_lower)
            except EngineError as e:
                deliveries.append((stream, e))
            else:
                self._streams[request.request_id] = stream
                if plan is not None:
                    deliveries.append((stream, plan))
        elif cmd == "pulled":
            plan, ok = stream
            core.pulled(arg, plan, ok)
        elif cmd == "onboarded":
            ticket, got = stream
            core.onboarded(arg, ticket, got)
        elif cmd == "offloaded":
            core.offloaded(arg)
        elif cmd == "replan":  # a parked preempted request's lookup answered
            core.replan(arg, stream)
        elif cmd == "tier_event":
            core.events.tier_event(*arg)
        elif cmd == "snapshot":
            self._publish_kv_events(core)  # events up to the snapshot reach the sink first
            snap = core.kv_snapshot()
            arg.get_loop().call_soon_threadsafe(resolve, arg, snap)
        elif cmd == "abort":
            out = core.abort(arg)
            target = self._streams.pop(arg, None)
            if out is not None and target is not None:
                deliveries.append((target, out))

    def _publish_kv_events(self, core: LLMEngine) -> None:
        events = core.drain_kv_events()
        if events and self._kv_sink is not None:
            loop, sink = self._kv_sink
            try:
                loop.call_soon_threadsafe(sink, events)
            except RuntimeError:
                pass
