"""G1 block pool: fixed-size KV blocks with reference counts and a prefix cache keyed by seq_hash.

States of a block:
- in use: ref_count > 0; owned by one or more running sequences (shared when a prefix is cached).
- cached-free: ref_count == 0 but still holding a full block's KV under a hash; reusable by a
  prefix hit, or evicted (hash dropped) when allocated for new content.
- free: ref_count == 0, no hash.

Invariants (checked by the hypothesis test):
- ref_count >= 0 always; a block is in the free queue iff its ref_count == 0.
- `cached[h].block_hash == h` for every entry; a hash maps to at most one block.
- Free queue order is eviction order: least recently released first. Blocks of a finished sequence
  are released tail first, so a long prefix's head outlives its tail.

Offload to lower tiers (kvbm/tiered_kv.py): with `offload_on` set, blocks that should be copied down
are appended to `to_offload`: "cache" (write-through) when a block is published, "release"
(write-back) when a published block's last reference goes, i.e. just before it becomes evictable. The
owner pins them (`touch`) for the copy, so a block is never reused while it is being read.
`offloaded` is true while lower tiers hold a copy of the block's current content; it is cleared with
the hash.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash", "offloaded")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None
        self.offloaded = False


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, on_evict: Callable[[list[int]], None] | None = None):
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, Block] = {}
        self._on_evict = on_evict  # told the hashes whose KV is gone (for KV events)
        self.offload_on: str | None = None  # None | "cache" (write-through) | "release" (write-back)
        self.to_offload: list[Block] = []

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks allocatable now: free plus cached-free (which allocation evicts)."""
        return len(self._free)

    def allocate(self, n: int) -> list[Block]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free")
        out, evicted = [], []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                evicted.append(block.block_hash)
                block.block_hash = None
                block.offloaded = False
            block.ref_count = 1
            out.append(block)
        if evicted and self._on_evict:
            self._on_evict(evicted)
        return out

    def lookup(self, hashes: Iterable[int]) -> list[Block]:
        """The longest run of leading hashes that are cached (not yet referenced by the caller)."""
        hits = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on cached blocks (a prefix hit)."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def release(self, blocks: Iterable[Block]) -> None:
        """Drop one reference on each block, in the order given (callers pass tail first)."""
        for block in blocks:
            if block.ref_count <= 0:
                raise AssertionError(f"block {block.block_id} released with ref_count {block.ref_count}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = None
                if self.offload_on == "release" and block.block_hash is not None and not block.offloaded:
                    self.to_offload.append(block)

    def cache(self, block: Block, block_hash: int) -> bool:
        """Publish a full block under its hash; True only if this newly published it. False if it was
        already published, or another block holds that hash (two sequences computed the same prefix
        concurrently): this block then stays private."""
        if block.block_hash is not None:
            return False
        if block_hash in self.cached:
            return False
        block.block_hash = block_hash
        self.cached[block_hash] = block
        if self.offload_on == "cache":
            self.to_offload.append(block)
        return True

    def reset_prefix_cache(self) -> list[int]:
        """Forget every cached-free block's hash; returns the hashes dropped."""
        dropped = []
        for block_id in self._free:
            block = self.blocks[block_id]
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                dropped.append(block.block_hash)
                block.block_hash = None
                block.offloaded = False
        return dropped
