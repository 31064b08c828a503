"""`KvCache`: the one thing the scheduler talks to about G1: the `BlockPool` (prefix cache, LRU) and the
worker's `KvEventLog` (every tier's events, numbered once).

Invariants: every block the pool publishes or evicts is one `stored`/`removed` G1 event, emitted in
the order it happened; `snapshot()` agrees exactly with the events numbered so far (kv_events.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvrelay.kvbm.block_pool import Block, BlockPool
from kvrelay.kvbm.events import KvEvent, KvSnapshot
from kvrelay.workers.core.kv_events import KvEventLog


class KvCache:
    def __init__(self, num_blocks: int):
        self.events = KvEventLog()
        self.pool = BlockPool(num_blocks, on_evict=self.events.g1_removed)

    # -- what the scheduler uses ------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def cached(self) -> dict[int, Block]:
        return self.pool.cached

    def lookup(self, hashes: Sequence[int]) -> list[Block]:
        return self.pool.lookup(hashes)

    def allocate(self, n: int) -> list[Block]:
        return self.pool.allocate(n)

    def touch(self, blocks: list[Block]) -> None:
        self.pool.touch(blocks)

    def release(self, blocks: Iterable[Block]) -> None:
        self.pool.release(blocks)

    def publish(self, blocks: list[Block], hashes: list[int], start: int, end: int) -> None:
        """Offer `blocks[start:end]` (now computed) to the prefix cache under `hashes`; each contiguous
        run that became cached is one `stored` event chained to the hash before it."""
        run_start = None
        for i in range(start, end + 1):
            cached = i < end and self.pool.cache(blocks[i], hashes[i])
            if cached and run_start is None:
                run_start = i
            elif not cached and run_start is not None:
                self.events.g1_stored(hashes[run_start:i], hashes[run_start - 1] if run_start > 0 else None)
                run_start = None

    # -- events -----------------------------------------------------------------------------------------
    def drain_events(self) -> list[KvEvent]:
        return self.events.drain()

    def snapshot(self) -> KvSnapshot:
        return self.events.snapshot(self.pool.cached)
