"""Lending blocks that only G2 holds (the cluster KV pool): when the leading run of a peer's ask that G1
caches stops short and G2 (host memory) holds the blocks that follow, they are loaded back into fresh
G1 blocks pinned under the same lease, then lent like any G1 block.

Why through G1 rather than straight from G2's slots: the transfer engine registers one pool per worker
(G1; NIXL descriptors, the TCP server's block ranges) and a pull reads block ids in it, so lending G1
blocks needs nothing new on the wire or in the transport. A G2 slot is also not pinned against its
own eviction, while a G1 block under a lease is; and the loaded blocks stay cached in G1 for this
worker's own next hit. The cost is one host-to-G1 copy per block, which the tiers already do for this
worker's own requests (the same `TieredKv.onboard`).

Only G2: G3 (disk) is slower than most peers' recompute budget inside the ask's 2 s, and G4 is shared,
so the puller's own tiers find those blocks without a peer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from kvrelay.kvbm.tiered_kv import OnboardPlan, TieredKv
from kvrelay.workers.core.commands import Command, LeaseFilled, LeaseGrow


async def lend_from_g2(post: Callable[[Command], None], tiers: TieredKv, lease_id: str, hashes: list[int],
                       have: list[int]) -> list[int]:
    """Extend the lease (`have`: its G1 block ids, the leading run of `hashes`) with the next blocks G2
    holds; the lease's block ids after. Never raises for tier trouble: the lease just stays as it was."""
    g2 = next((s for s in tiers.stores if s.tier == "G2" and s.enabled), None)
    rest = hashes[len(have):]
    if g2 is None or not rest:
        return have
    hits = await g2.contains(rest)
    n = next((i for i, hit in enumerate(hits) if not hit), len(rest))
    if n == 0:
        return have
    fresh: list[int] = await _ask(post, lambda fut: LeaseGrow(lease_id, n, fut))
    if not fresh:
        return have
    ok = [False] * len(fresh)
    try:
        ok = await tiers.onboard(OnboardPlan(rest[:len(fresh)], fresh, ["G2"] * len(fresh)))
    except Exception:  # a tier that fails disables itself; these blocks are just not lent
        pass
    return await _ask(post, lambda fut: LeaseFilled(lease_id, hashes, ok, fut))


async def _ask(post: Callable[[Command], None], make: Callable[[asyncio.Future], Command]) -> Any:
    fut: asyncio.Future = asyncio.get_running_loop().create_future()
    post(make(fut))
    return await fut
