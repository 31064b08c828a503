"""`EngineLoop`: the asyncio face of an `EngineCore` (implements `workers.protocol.Engine`) for every
engine that runs the core: request streams, pulls and onboards, snapshots, stats. How the core is
driven is the subclass's: its own thread (`ThreadDriver`, the native engine: torch releases the GIL
inside kernels) or steps on the event loop (`LoopDriver`, the mocker: it only sleeps).

The loop side reaches the core only through `_post(cmd, arg, extra)` (runner.py's commands), and
the core reaches a request only through its `Stream`.

Invariant: every request handed to the core ends with exactly one final output or one exception
delivered to its stream; a stream whose consumer leaves early sends an abort, so its blocks are freed.
Blocks allocated for a pull or an onboard stay out of reach until the loader reports, whatever happens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from kvrelay.kvbm.events import KvEvent, KvSnapshot
from kvrelay.workers.api.messages import EngineOutput, EngineRequest, EngineStats, KvLayout
from kvrelay.workers.core.commands import Command
from kvrelay.workers.core.engine_core import EngineCore
from kvrelay.workers.core.errors import EngineError
from kvrelay.workers.core.handoff import PullPlan
from kvrelay.workers.core.onboard import OnboardTicket
from kvrelay.workers.core.runner import CoreRunner
from kvrelay.workers.core.streams import Stream
from kvrelay.workers.protocol import KvPuller, PrefillResult

if TYPE_CHECKING:  # tier_link imports torch; an engine without tiers (the mocker) never loads it
    from kvrelay.workers.core.tier_link import TierLink

log = logging.getLogger(__name__)


class EngineLoop:
    owns_kv_transfer = False  # KV moves through the worker's transfer engine and the puller

    def __init__(self) -> None:
        self.core: EngineCore | None = None
        self.runner: CoreRunner | None = None
        self.tiers: TierLink | None = None  # G2/G3/G4, when configured and any opened
        self._puller: KvPuller | None = None
        self._kv_sink: tuple[asyncio.AbstractEventLoop, Callable[[list[KvEvent]], None]] | None = None
        self._no_handle_reason = "no transfer engine"

    # -- what a driver supplies -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        raise NotImplementedError

    def _post(self, cmd: str, arg: Any, extra: Any) -> None:
        raise NotImplementedError

    def _publish(self, events: list[KvEvent]) -> None:
        """Hand KV events to the sink, in order; called by the core's owner."""
        raise NotImplementedError

    async def _stop_driver(self) -> None:
        """Stop stepping; every request still in flight ends with "engine shut down"."""
        raise NotImplementedError

    async def close(self) -> None:
        if not self.running:
            return
        if self.tiers is not None:
            await self.tiers.drain()  # copies in flight finish (and unpin) before the core stops
        await self._stop_driver()
        if self.tiers is not None:
            await self.tiers.close()

    # -- Engine protocol --------------------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if not self.running:
            raise EngineError("engine is not running")
        if request.kv_handle is not None and self._puller is None:
            raise EngineError(f"this worker cannot take a KV handle ({self._no_handle_reason})")
        in_lower = await self.tiers.lookup(request) if self.tiers is not None and request.kv_handle is None else None
        stream = Stream(asyncio.get_running_loop())
        self._post(Command.ADD, (request, False, in_lower), stream)
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
                self._post(Command.ABORT, request.request_id, None)

    async def _load(self, request: EngineRequest, item: PullPlan | OnboardTicket) -> None:
        """Fill the blocks the core allocated (pull from a prefill worker, or onboard from tiers) and
        report to the core, always: until it hears back it keeps those blocks out of reach."""
        if isinstance(item, PullPlan):
            assert self._puller is not None and request.kv_handle is not None
            try:  # a cancelled pull returns only once the transport stopped writing the blocks
                ok = await self._puller.pull(request.kv_handle, item.local_block_ids, item.start)
            except BaseException:
                self._post(Command.PULLED, request.request_id, (item, False))
                raise
            self._post(Command.PULLED, request.request_id, (item, ok))
            return
        assert self.tiers is not None
        await self.tiers.onboard(request.request_id, item)

    async def abort(self, request_id: str) -> None:
        self._post(Command.ABORT, request_id, None)

    async def prefill(self, request: EngineRequest) -> PrefillResult:
        if not self.running:
            raise EngineError("engine is not running")
        in_lower = await self.tiers.lookup(request) if self.tiers is not None else None
        stream = Stream(asyncio.get_running_loop())
        self._post(Command.ADD, (request, True, in_lower), stream)
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
                self._post(Command.ABORT, request.request_id, None)

    def set_kv_puller(self, puller: KvPuller) -> None:
        self._puller = puller

    def subscribe_kv_events(self, sink: Callable[[list[KvEvent]], None]) -> None:
        """`sink` is called on the current event loop with each step's KV events, in event_id order."""
        self._kv_sink = (asyncio.get_running_loop(), sink)

    async def kv_snapshot(self) -> KvSnapshot:
        """What the worker's tiers hold, consistent with the event stream: every event with id <=
        last_event_id was handed to the sink before this returns."""
        fut = asyncio.get_running_loop().create_future()
        self._post(Command.SNAPSHOT, fut, None)
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
        raise NotImplementedError

    def _core_stats(self) -> EngineStats:
        assert self.core is not None, "start() first"
        return self.core.stats()

    def stats(self) -> EngineStats:
        s = self._core_stats()
        return s if self.tiers is None else msgspec.structs.replace(s, tiers=self.tiers.counters())

    async def _open_tiers(self, cfg: Any, rows: Any) -> None:
        """Open the lower tiers over `rows` (the G1 pool as uint8 [num_blocks, block_bytes])."""
        assert self.core is not None and self.runner is not None
        if cfg is not None and cfg.any:
            from kvrelay.workers.core.tier_link import TierLink

            self.tiers = await TierLink.open(cfg, self.core, rows, self._post)
            self.runner.tiers = self.tiers
