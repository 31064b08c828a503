"""`EngineLoop`: the asyncio face of an `EngineCore` (implements `workers.protocol.Engine` for every
engine that runs the core): request streams, the KV sources' loop halves, snapshots, stats. Who owns
the core and steps it is a `CoreDriver` composed into it (driver.py): its own thread (`ThreadDriver`)
or the event loop (`LoopDriver`). An engine supplies the core (`_attach`) and its layout.

The loop side reaches the core only through `driver.post(command)` (commands.py), and the core reaches
a request only through its `Stream`.

Invariant: every request handed to the core ends with exactly one final output or one exception
delivered to its stream; a stream whose consumer leaves early sends an abort, so its blocks are freed.
Blocks a KV source is filling stay out of reach until it reports, whatever happens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from kvrelay.kvbm.events import KvEvent, KvSnapshot
from kvrelay.workers.api.errors import EngineError
from kvrelay.workers.api.messages import EngineOutput, EngineRequest, EngineStats, KvLayout
from kvrelay.workers.api.prefill import KvPuller, PeerLink, PrefillResult
from kvrelay.workers.core.commands import Abort, Add, Lease, Snapshot, Wake
from kvrelay.workers.core.driver import CoreDriver, Sink
from kvrelay.workers.core.engine_core import EngineCore
from kvrelay.workers.core.kv_sources.handoff import HandoffSource
from kvrelay.workers.core.kv_sources.handoff_loop import HandoffLoop
from kvrelay.workers.core.kv_sources.loops import SourceLoops
from kvrelay.workers.core.kv_sources.peer import LEND_WAIT_S, PeerSource
from kvrelay.workers.core.kv_sources.peer_loop import PeerLoop
from kvrelay.workers.core.runner import CoreRunner
from kvrelay.workers.core.streams import Stream

if TYPE_CHECKING:  # kvbm's tiers import torch; an engine without tiers (the mocker) never loads them
    from kvrelay.kvbm.tier_config import TierConfig

log = logging.getLogger(__name__)


class EngineLoop:
    owns_kv_transfer = False  # KV moves through the worker's transfer engine and the puller
    lends_through_connector = False  # peers read G1 through the worker's transfer engine

    def __init__(self, driver: CoreDriver):
        self.driver = driver
        self.core: EngineCore | None = None
        self.loops: SourceLoops | None = None  # the KV sources' loop halves
        self._sink: Sink | None = None
        self._no_handle_reason = "no transfer engine"
        self._rows: Callable[[], Any] | None = None  # the G1 pool as uint8 rows, where it is real memory

    async def _attach(self, core: EngineCore, tiers: TierConfig | None = None,
                      rows: Callable[[], Any] | None = None) -> None:
        """Run `core`: its KV sources (the handoff always; the lower tiers when `tiers` opens any, over
        `rows()`, the G1 pool as uint8 [num_blocks, block_bytes]; peers always, after the tiers: a
        block this worker has in G2 is nearer than another worker's), then the driver."""
        if self.driver.running:
            return
        self.core = core
        self._rows = rows
        self.loops = SourceLoops(asyncio.get_running_loop(), self.driver.post)
        core.door.add_source(HandoffSource(core.block_size, core.fingerprint))
        if tiers is not None and tiers.any and rows is not None:
            await self._open_tiers(core, tiers, rows())
        core.door.add_source(PeerSource(core.block_size, core.fingerprint))
        await self.driver.start(core, CoreRunner(core, self._publish, self.loops.submit))

    async def _open_tiers(self, core: EngineCore, cfg: TierConfig, rows: Any) -> None:
        from kvrelay.workers.core.kv_sources.save_pins import OffloadTracker
        from kvrelay.workers.core.kv_sources.tiers import TierSource  # tiers_loop imports torch
        from kvrelay.workers.core.kv_sources.tiers_loop import TiersLoop

        assert self.loops is not None
        half = await TiersLoop.open(cfg, rows, core.block_size, core.fingerprint, core.pool.cached, self.driver.post,
                                    layout=self.kv_layout())
        if half is not None:
            core.door.add_source(TierSource(core.block_size, half.tiers.cost, g1_has=core.kv.cached.__contains__,
                                            pins=OffloadTracker(core.kv.pool, cfg.offload,
                                                                max_pinned=core.kv.num_blocks // 4)))
            self.loops.add(half)

    def kv_layout(self) -> KvLayout:
        """The G1 pool's layout (each engine's own); the tiers' codecs read blocks through it."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.driver.running

    async def close(self) -> None:
        if not self.running:
            return
        assert self.loops is not None
        await self.loops.drain()  # saves in flight finish (and unpin) before the core stops
        await self.driver.stop()
        await self.loops.close()

    # -- Engine protocol --------------------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if not self.running:
            raise EngineError("engine is not running")
        assert self.loops is not None
        if request.kv_handle is not None and self.loops.get("handoff") is None:
            raise EngineError(f"this worker cannot take a KV handle ({self._no_handle_reason})")
        await self._prepare(request)
        hints = await self.loops.before_add(request)
        stream = Stream(asyncio.get_running_loop())
        self.driver.post(Add(request, stream, hints=hints))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                assert isinstance(item, EngineOutput)
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._abort(request.request_id)

    async def _prepare(self, request: EngineRequest) -> None:
        """The engine's own work before a request is posted to the core, off the core's thread (the native
        engine compiles its structured-output grammar here). Raises EngineError to refuse the request."""

    def _abort(self, request_id: str) -> None:
        self.driver.post(Abort(request_id))
        if self.loops is not None:
            self.loops.cancel(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    async def prefill(self, request: EngineRequest) -> PrefillResult:
        if not self.running:
            raise EngineError("engine is not running")
        assert self.loops is not None
        await self._prepare(request)
        hints = await self.loops.before_add(request)
        stream = Stream(asyncio.get_running_loop())
        self.driver.post(Add(request, stream, hold=True, hints=hints))
        done = False
        try:
            item = await stream.queue.get()
            done = True
            if isinstance(item, Exception):
                raise item
            if isinstance(item, PrefillResult):
                return item
            assert item.finish_reason is not None
            return PrefillResult(item, [])  # the first token ended it (stop, max_tokens=1): nothing held
        finally:
            if not done:  # cancelled mid-prefill: free its blocks
                self._abort(request.request_id)

    def set_kv_puller(self, puller: KvPuller) -> None:
        assert self.loops is not None, "start() first"
        self.loops.add(HandoffLoop(puller))

    def set_peer_puller(self, puller: KvPuller, link: PeerLink) -> None:
        """Pull prefixes other workers hold (`EngineRequest.kv_peer`): lease them over `link`, copy them
        with `puller`, verify them against the lender's checksums. Without it a request's peer is ignored
        (its ask fails at once: recomputed)."""
        assert self.loops is not None, "start() first"
        checksums = self.block_checksums if self.kv_pool() is not None else None
        self.loops.add(PeerLoop(puller, link, self.kv_layout().block_bytes, checksums))

    async def block_checksums(self, block_ids: list[int]) -> list[int]:
        """xxh3_64 of each G1 block's bytes ([] where the KV is not real memory: the mocker). Device
        rows are copied to the host on a thread, so the loop never waits for the device."""
        if self._rows is None or self.kv_pool() is None:
            return []
        from kvrelay.kvbm.block_checksum import block_checksums  # imports torch

        rows = self._rows()
        if rows.device.type == "cpu":  # summed in place: microseconds per block
            return block_checksums(rows, block_ids)
        return await asyncio.to_thread(block_checksums, rows, block_ids)

    def kv_pool(self) -> Any:
        """The G1 pool tensor, or None where the KV is not real memory (each engine's own)."""
        return None

    def subscribe_kv_events(self, sink: Callable[[list[KvEvent]], None]) -> None:
        """`sink` is called on the current event loop with each step's KV events, in event_id order."""
        self._sink = (asyncio.get_running_loop(), sink)

    def _publish(self, events: list[KvEvent]) -> None:
        if self._sink is not None:
            self.driver.publish(self._sink, events)

    def transfer_stats(self) -> None:
        return None  # the worker's transfer engine moves this engine's KV

    def lend_pool(self) -> None:
        return None  # lent blocks are G1's, in the worker's transfer engine

    async def lease_blocks(self, lease_id: str, hashes: list[int]) -> list[int]:
        if not self.running:
            return []
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self.driver.post(Lease(lease_id, hashes, fut))
        if not fut.done():
            # The lease may wait for a prefill in progress here (lease_waits.py): the bound is checked
            # when a step ends or a command arrives, so make sure one arrives at the bound.
            timer = asyncio.get_running_loop().call_later(LEND_WAIT_S, self.driver.post, Wake())
            fut.add_done_callback(lambda _: timer.cancel())
        block_ids = await fut
        tiers = self.loops.get("tiers") if self.loops is not None else None
        if tiers is not None and len(block_ids) < len(hashes):  # G1 stops short: G2 may hold the rest
            from kvrelay.workers.core.lend_from_g2 import lend_from_g2  # the tiers import torch

            block_ids = await lend_from_g2(self.driver.post, tiers.tiers, lease_id, hashes, block_ids)
        return block_ids

    async def kv_snapshot(self) -> KvSnapshot:
        """What the worker's tiers hold, consistent with the event stream: every event with id <=
        last_event_id was handed to the sink before this returns."""
        fut: asyncio.Future[KvSnapshot] = asyncio.get_running_loop().create_future()
        self.driver.post(Snapshot(fut))
        return await fut

    @property
    def fingerprint(self) -> str:
        assert self.core is not None, "start() first"
        return self.core.fingerprint

    @property
    def max_model_len(self) -> int:
        assert self.core is not None, "start() first"
        return self.core.max_model_len

    def stats(self) -> EngineStats:
        s = self.driver.stats()
        tiers = self.loops.get("tiers") if self.loops is not None else None
        if tiers is not None:
            s = msgspec.structs.replace(s, tiers=tiers.counters())
        peers = self.loops.get("peer") if self.loops is not None else None
        if peers is not None:  # what the peer source's loop half measured
            p = peers.stats
            s = msgspec.structs.replace(
                s, peer_verify_failures=p.verify_failures, peer_pulled_bytes=p.pulled_bytes,
                peer_pull_seconds_buckets=list(p.seconds_counts), peer_pull_seconds_sum=p.seconds_sum,
                peer_pulls_in_flight=peers.budget.in_flight, peer_budget_refusals=peers.budget.refusals)
        return s
