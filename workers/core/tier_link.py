"""An engine core's link to its lower tiers (kvbm/tiered_kv.py): the asyncio half of offload and
onboarding, and the one path by which tier events and finished copies reach the core's owner (its
thread, or the event loop itself).

`post(cmd, arg, extra)` hands a command to the core's owner (runner.py); everything that crosses
threads goes through it or through `call_soon_threadsafe`, nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from kvrelay.kvbm.hashing import BlockHasher, root_hash
from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.kvbm.tiered_kv import TieredKv, TierFlow
from kvrelay.kvbm.tiers import TierStats
from kvrelay.workers.api.messages import EngineRequest, TierCounters
from kvrelay.workers.core.commands import Command
from kvrelay.workers.core.engine_core import EngineCore
from kvrelay.workers.core.onboard import OnboardTicket

log = logging.getLogger(__name__)
Post = Callable[[str, Any, Any], None]


class TierLink:
    def __init__(self, tiers: TieredKv, core: EngineCore, post: Post):
        self.tiers, self.core, self.post = tiers, core, post
        self.block_size = core.block_size
        self.loop = asyncio.get_running_loop()
        self._lookups: set[asyncio.Task] = set()  # parked preempted requests' lookups in flight

    @classmethod
    async def open(cls, cfg: TierConfig, core: EngineCore, rows: Any, post: Post) -> TierLink | None:
        """Open the configured tiers over `core`'s G1 pool (`rows`: its bytes as a uint8 tensor
        [num_blocks, block_bytes]) and switch its offloading on; None if no tier could be opened (each
        one that failed said why)."""

        def sink(tier: str, kind: str, hashes: list[int]) -> None:
            post(Command.TIER_EVENT, (tier, kind, hashes), None)

        tiers = await TieredKv.open(cfg, rows, core.block_size, core.fingerprint, sink=sink)
        if not tiers.stores:
            return None
        core.enable_tiers(cfg.offload, tiers.cost)
        log.info("KV tiers: %s (offload %s, onboard %s)", ", ".join(tiers.tiers), cfg.offload, cfg.onboard)
        return cls(tiers, core, post)

    # -- event loop side --------------------------------------------------------------------------------
    async def lookup(self, request: EngineRequest) -> list[str | None] | None:
        """Which lower tier holds each of the prompt's full blocks (None: no tier worth asking)."""
        n = (len(request.prompt_token_ids) - 1) // self.block_size
        if n == 0:
            return None
        hasher = BlockHasher(self.block_size, root_hash(self.core.fingerprint, request.cache_salt),
                             request.lora_name.encode())
        hasher.extend(request.prompt_token_ids[:n * self.block_size])
        g1 = self.core.pool.cached  # read from this thread: a hint, the engine thread decides
        if all(h in g1 for h in hasher.hashes):
            return None
        return await self.tiers.lookup(hasher.hashes, in_g1=g1.__contains__)

    async def onboard(self, request_id: str, ticket: OnboardTicket) -> None:
        """Fill the ticket's G1 blocks and report to the engine thread, always: until it hears back it
        keeps those blocks out of reach. Tier I/O cannot be interrupted, so a cancelled caller still
        waits for it to stop writing."""
        task = asyncio.ensure_future(self.tiers.onboard(ticket.plan))
        try:
            got = await asyncio.shield(task)
        except BaseException:
            self.post(Command.ONBOARDED, request_id, (ticket, await _settle(task, len(ticket.plan.hashes))))
            raise
        self.post(Command.ONBOARDED, request_id, (ticket, got))

    async def _relookup(self, request_id: str, hashes: list[int]) -> None:
        in_lower: list[str | None] = []
        try:
            # No G1 hint: the request waits for blocks, and what G1 has now it may have evicted by then.
            in_lower = await self.tiers.lookup(hashes)
        except Exception:  # a failed lookup costs a recompute, nothing else
            log.warning("lower-tier lookup for preempted request %s failed", request_id, exc_info=True)
        finally:  # always answered: the request is parked until then
            self.post(Command.REPLAN, request_id, in_lower)

    def _start_relookup(self, request_id: str, hashes: list[int]) -> None:
        task = self.loop.create_task(self._relookup(request_id, hashes))
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)

    def counters(self) -> list[TierCounters]:
        return [tier_counters(s, f) for s, f in self.tiers.stats()]

    async def close(self) -> None:
        await asyncio.gather(*self._lookups, return_exceptions=True)
        await self.tiers.close()

    async def drain(self) -> None:
        await self.tiers.drain()

    # -- engine thread side -----------------------------------------------------------------------------
    def flush_offload(self) -> None:
        """Hand the engine's next offload batch (pinned G1 blocks) to the loop for copying."""
        batch = self.core.take_offload()
        if batch is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.tiers.offload, batch[0], batch[1], self._offloaded)
        except RuntimeError:  # the loop is gone (shutdown): nobody will copy them
            self.core.offloaded(batch[1])

    def relookup(self, lookups: list[tuple[str, list[int]]]) -> None:
        """Look parked preempted requests' blocks up in the tiers; each answer comes back as `replan`."""
        for request_id, hashes in lookups:
            try:
                self.loop.call_soon_threadsafe(self._start_relookup, request_id, hashes)
            except RuntimeError:  # the loop is gone (shutdown): answer at once, nothing found
                self.post(Command.REPLAN, request_id, [])

    def _offloaded(self, block_ids: list[int]) -> None:
        self.post(Command.OFFLOADED, block_ids, None)


async def _settle(task: asyncio.Future, n: int) -> list[bool]:
    """The onboard's result once it has finished; all-miss if it failed or was cancelled."""
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            continue  # cancelled again: still wait, the tier may be writing G1 blocks
        except Exception:
            break
    if task.cancelled() or task.exception() is not None:
        return [False] * n
    return task.result()


def tier_counters(s: TierStats, f: TierFlow) -> TierCounters:
    return TierCounters(
        tier=s.tier, enabled=s.enabled, capacity_bytes=s.capacity_bytes, footprint_bytes=s.footprint_bytes,
        used_bytes=s.used_bytes, blocks=s.blocks, hits=s.hits, misses=s.misses, evictions=s.evictions,
        rejected_puts=s.rejected_puts, checksum_failures=s.checksum_failures, errors=s.errors,
        onboard_blocks=f.onboard_blocks, onboard_bytes=f.onboard_bytes, onboard_seconds=f.onboard_seconds,
        offload_blocks=f.offload_blocks, offload_bytes=f.offload_bytes, offload_seconds=f.offload_seconds)
