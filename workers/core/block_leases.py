"""G1 blocks lent to other workers (the cluster KV pool): a peer pulling a prefix this worker holds
pins the blocks under a lease id until its pull ends (its notification, `release`, or the lease's
expiry free it: workers/kv_handoff.py `PrefillLeases`, the same timers as a prefill's handle).

Invariants: a lease pins each of its blocks once (`touch`) and unpins it exactly once (`release`);
a leased block is never evicted nor reused while pinned (the pool's reference count), so a pull never
reads a block that was given to another sequence; lease ids never collide with request ids (the
caller prefixes them).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvrelay.kvbm.block_pool import Block
from kvrelay.workers.core.kv_cache import KvCache


class BlockLeases:
    def __init__(self, kv: KvCache):
        self.kv = kv
        self._leases: dict[str, list[Block]] = {}
        self.lent_blocks = 0  # cumulative: blocks pinned for peers

    def lease(self, lease_id: str, hashes: Sequence[int]) -> list[int]:
        """Pin the leading run of `hashes` that G1 caches; their block ids ([]: none, nothing pinned)."""
        if lease_id in self._leases:
            return [b.block_id for b in self._leases[lease_id]]
        blocks = self.kv.lookup(hashes)
        if blocks:
            self.kv.touch(blocks)
            self._leases[lease_id] = blocks
            self.lent_blocks += len(blocks)
        return [b.block_id for b in blocks]

    def release(self, lease_id: str) -> bool:
        """Unpin a lease's blocks; False if there is no such lease (already freed, or a request id)."""
        blocks = self._leases.pop(lease_id, None)
        if blocks is None:
            return False
        self.kv.release(blocks)
        return True

    def release_all(self) -> None:
        for lease_id in list(self._leases):
            self.release(lease_id)

    @property
    def pinned(self) -> int:
        return sum(len(b) for b in self._leases.values())
