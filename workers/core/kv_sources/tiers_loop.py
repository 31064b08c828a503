"""The loop half of the tier source: the lower tiers G2/G3/G4 (kvbm/tiered_kv.py) on the worker's event
loop. It looks a request's prompt up before it is queued (`before_add`), runs the core half's jobs
(`TierLookup`, `TierLoad`, `TierSave`) and reports each through the core's commands; tier events go the
same way (`KvTierEvents`), so every tier's events are numbered in the core's one event log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from kvrelay.kvbm.hashing import BlockHasher, root_hash
from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.kvbm.tiered_kv import OnboardPlan, TieredKv, TierFlow
from kvrelay.kvbm.tiers import TierStats
from kvrelay.workers.api.messages import EngineRequest, KvLayout, TierCounters
from kvrelay.workers.core.commands import KvAnswered, KvLoaded, KvSaved, KvTierEvents
from kvrelay.workers.core.kv_sources.source import Post
from kvrelay.workers.core.kv_sources.tiers import NAME, TierLoad, TierLookup, Tiers, TierSave

log = logging.getLogger(__name__)


class TiersLoop:
    name = NAME

    def __init__(self, tiers: TieredKv, block_size: int, fingerprint: str, g1: dict[int, Any]):
        """`g1`: the core's prefix cache (hash -> block), read here only as a hint."""
        self.tiers, self.block_size, self.fingerprint, self.g1 = tiers, block_size, fingerprint, g1
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    async def open(cls, cfg: TierConfig, rows: Any, block_size: int, fingerprint: str, g1: dict[int, Any],
                   post: Post, layout: KvLayout | None = None) -> TiersLoop | None:
        """Open the configured tiers over the G1 pool (`rows`: its bytes as a uint8 tensor [num_blocks,
        block_bytes]); None if no tier could be opened (each one that failed said why)."""

        def sink(tier: str, kind: str, hashes: list[int]) -> None:
            post(KvTierEvents(tier, kind, hashes))

        tiers = await TieredKv.open(cfg, rows, block_size, fingerprint, sink=sink, layout=layout)
        if not tiers.stores:
            return None
        log.info("KV tiers: %s (offload %s, onboard %s)", ", ".join(tiers.tiers), cfg.offload, cfg.onboard)
        return cls(tiers, block_size, fingerprint, g1)

    async def before_add(self, request: EngineRequest) -> Tiers | None:
        """Which lower tier holds each of the prompt's full blocks (None: no tier worth asking)."""
        if request.kv_handle is not None:
            return None  # its KV comes from the prefill worker
        n = (len(request.prompt_token_ids) - 1) // self.block_size
        if n == 0:
            return None
        hasher = BlockHasher(self.block_size, root_hash(self.fingerprint, request.cache_salt),
                             request.lora_name.encode())
        hasher.extend(request.prompt_token_ids[:n * self.block_size])
        g1 = self.g1  # read from this thread: a hint, the core decides
        if all(h in g1 for h in hasher.hashes):
            return None
        return await self.tiers.lookup(hasher.hashes, in_g1=g1.__contains__)

    def start(self, job: TierLookup | TierLoad | TierSave, post: Post) -> None:
        match job:
            case TierSave(hashes=hashes, block_ids=block_ids):
                self.tiers.offload(hashes, block_ids, lambda ids: post(KvSaved(NAME, ids)))
                return
            case TierLookup():
                coro = self._lookup(job, post)
            case TierLoad():
                coro = self._load(job, post)
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lookup(self, job: TierLookup, post: Post) -> None:
        found: Tiers = []
        try:
            # No G1 hint: the request waits for blocks, and what G1 has now it may have evicted by then.
            found = await self.tiers.lookup(job.hashes)
        except Exception:  # a failed lookup costs a recompute, nothing else
            log.warning("lower-tier lookup for preempted request %s failed", job.request_id, exc_info=True)
        finally:  # always answered: the request is parked until then
            post(KvAnswered(NAME, job.request_id, found))

    async def _load(self, job: TierLoad, post: Post) -> None:
        """Fill the job's G1 blocks and report, always: until the core hears back it keeps those blocks
        out of reach. Tier I/O cannot be interrupted, so shutdown still waits for it to stop writing."""
        ok = [False] * len(job.hashes)
        task = asyncio.ensure_future(self.tiers.onboard(OnboardPlan(job.hashes, job.block_ids, job.tiers)))
        try:
            ok = await asyncio.shield(task)
        except asyncio.CancelledError:
            ok = await _settle(task, len(job.hashes))
        except Exception:
            log.exception("loading KV from the tiers failed for request %s; recomputing", job.request_id)
        finally:
            post(KvLoaded(NAME, job.request_id, ok))

    def cancel(self, request_id: str) -> None:
        pass  # tier I/O cannot be interrupted; the load reports when done

    def counters(self) -> list[TierCounters]:
        return [tier_counters(s, f) for s, f in self.tiers.stats()]

    async def drain(self) -> None:
        """Wait for every job in flight: loads and lookups (their reports posted) and saves (unpinned)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.tiers.drain()

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.tiers.close()


async def _settle(task: asyncio.Future, n: int) -> list[bool]:
    """The load's result once it has finished; all-miss if it failed or was cancelled."""
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
    """The contract's view of one tier: every `TierCounters` field, taken by name from the store's
    `TierStats` and the G1<->tier `TierFlow` (a field missing from both is a KeyError)."""
    names = TierCounters.__struct_fields__
    values = {**dataclasses.asdict(s), **dataclasses.asdict(f)}
    return TierCounters(**{n: values[n] for n in names})
