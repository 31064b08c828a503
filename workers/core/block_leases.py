"""G1 blocks lent to other workers (the cluster KV pool): a peer pulling a prefix this worker holds
pins the blocks under a lease id until its pull ends (its notification, `release`, or the lease's
expiry free it: workers/kv_handoff.py `PrefillLeases`, the same timers as a prefill's handle).

A lease covers the leading run of the asked hashes that G1 caches (`lease`) and, when G2 holds the
blocks that follow, those too: the lease grows by fresh G1 blocks (`grow`) that the loop half fills from
G2 (workers/core/lend_from_g2.py) and then `filled` publishes in G1 (they are G1 blocks like any other,
one `stored` event) and keeps in the lease, up to the first block that did not arrive.

Invariants: a lease pins each of its blocks once (`touch`/`allocate`) and unpins it exactly once
(`release`); a leased block is never evicted nor reused while pinned (the pool's reference count), so a
pull never reads a block that was given to another sequence; blocks being filled from G2 are freed only
after `filled` (the tier may be writing them), even if the lease was released meanwhile; lease ids
never collide with request ids (the caller prefixes them).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvrelay.kvbm.block_pool import Block
from kvrelay.workers.core.kv_cache import KvCache


class BlockLeases:
    def __init__(self, kv: KvCache):
        self.kv = kv
        self._leases: dict[str, list[Block]] = {}
        self._filling: dict[str, list[Block]] = {}  # lease id -> fresh blocks G2 is writing
        self._released_filling: set[str] = set()  # leases released while their blocks were filling
        self.lent_blocks = 0  # cumulative: blocks pinned for peers
        self.lent_from_g2 = 0  # cumulative, of those: loaded from G2 to be lent

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

    def grow(self, lease_id: str, n: int) -> list[int]:
        """Up to `n` fresh blocks (as many as are free) for G2 to fill, pinned under the lease; [] if the
        lease is already growing or none is free. `filled` ends the growth."""
        if lease_id in self._filling:
            return []
        n = min(n, self.kv.num_free)
        if n <= 0:
            return []
        blocks = self.kv.allocate(n)
        self._leases.setdefault(lease_id, [])
        self._filling[lease_id] = blocks
        return [b.block_id for b in blocks]

    def filled(self, lease_id: str, hashes: Sequence[int], ok: Sequence[bool]) -> list[int]:
        """G2 filled the grown blocks (`ok` per block): keep the leading run that arrived, published in G1
        under their hashes (`hashes`: the whole asked run, the lease's blocks first), free the rest. The
        lease's block ids ([] if it was released meanwhile: then every block is freed)."""
        fresh = self._filling.pop(lease_id, [])
        kept = next((i for i, fine in enumerate(ok) if not fine), len(fresh))
        kept = min(kept, len(fresh))
        if lease_id in self._released_filling:  # the lease ended while G2 wrote: nothing is lent now
            self._released_filling.discard(lease_id)
            self.kv.release(reversed(fresh))
            return []
        blocks = self._leases[lease_id]
        start = len(blocks)
        blocks.extend(fresh[:kept])
        self.kv.release(reversed(fresh[kept:]))
        if kept:
            self.kv.publish(blocks, list(hashes[:len(blocks)]), start, len(blocks))
            self.lent_blocks += kept
            self.lent_from_g2 += kept
        if not blocks:
            del self._leases[lease_id]
        return [b.block_id for b in blocks]

    def release(self, lease_id: str) -> bool:
        """Unpin a lease's blocks; False if there is no such lease (already freed, or a request id). Blocks
        still filling are freed by `filled`."""
        blocks = self._leases.pop(lease_id, None)
        if blocks is None:
            return False
        self.kv.release(reversed(blocks))
        if lease_id in self._filling:
            self._released_filling.add(lease_id)
        return True

    def release_all(self) -> None:
        for lease_id in list(self._leases):
            self.release(lease_id)

    @property
    def pinned(self) -> int:
        return sum(len(b) for b in self._leases.values()) + sum(len(b) for b in self._filling.values())
