"""Engine-thread side of offload to lower tiers: pick the G1 blocks to copy down and pin them meanwhile.

`take()` turns the pool's candidates (`BlockPool.to_offload`) into one batch: each block still holding
a hash, not yet offloaded, pinned with one extra reference so no allocation can evict and overwrite it
while the loop copies it. `done(block_ids)` drops those pins and marks the blocks offloaded (their last
reference then puts them back in the free queue, in the order the batch had).

Invariants: every block in a taken batch is pinned exactly once until its `done`; at most `max_pinned`
blocks are pinned at any time. Candidates beyond that wait (at most one entry per G1 block) for the
next `take`; one evicted while waiting is lost to the lower tiers and counted in `skipped`.
"""

from __future__ import annotations

from kvrelay.kvbm.block_pool import Block, BlockPool

OFFLOAD_MODES = {"write-back": "release", "write-through": "cache"}


class OffloadTracker:
    def __init__(self, pool: BlockPool, mode: str, max_pinned: int):
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"unknown offload mode {mode!r}; choose one of {sorted(OFFLOAD_MODES)}")
        self.pool, self.max_pinned = pool, max(1, max_pinned)
        pool.offload_on = OFFLOAD_MODES[mode]
        self._inflight: dict[int, Block] = {}  # block_id -> pinned block
        self._waiting: dict[int, Block] = {}  # block_id -> candidate not yet taken (insertion order)
        self.skipped = 0  # candidates evicted from G1 before they could be copied down

    @property
    def pinned(self) -> int:
        return len(self._inflight)

    def take(self) -> tuple[list[int], list[int]] | None:
        """(hashes, block_ids) of the next batch, pinned; None if there is nothing to copy."""
        for block in self.pool.to_offload:
            self._waiting[block.block_id] = block
        self.pool.to_offload.clear()
        batch: list[Block] = []
        for block_id, block in list(self._waiting.items()):
            if len(self._inflight) >= self.max_pinned:
                break
            del self._waiting[block_id]
            if block.block_hash is None:
                self.skipped += 1  # evicted (reused) before its turn
                continue
            if block.offloaded or block_id in self._inflight:
                continue  # already down, or being copied
            batch.append(block)
            self._inflight[block_id] = block
        if not batch:
            return None
        self.pool.touch(batch)
        return [b.block_hash for b in batch], [b.block_id for b in batch]  # type: ignore[misc]  # block_hash is set: checked just above

    def done(self, block_ids: list[int]) -> None:
        blocks = [self._inflight.pop(i) for i in block_ids if i in self._inflight]
        for b in blocks:
            b.offloaded = True
        self.pool.release(blocks)  # offers nothing again: they are marked offloaded

    def release_all(self) -> None:
        """Shutdown: drop every pin (the copies were abandoned)."""
        self.done(list(self._inflight))
