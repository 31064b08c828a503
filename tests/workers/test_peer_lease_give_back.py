"""Giving a peer's lease back (the cluster KV pool): a `release` that overtakes the grant (the asker
timed out or was cancelled while the holder was frozen or slow) frees the grant when it comes, at once;
the pull budget refuses what would pass its bounds and frees what ended."""

from __future__ import annotations

import asyncio

from kvrelay.workers.core.kv_sources.peer_budget import PullBudget
from kvrelay.workers.kv_handoff import PrefillLeases


def test_a_release_that_overtakes_the_grant_frees_the_grant_at_once():
    async def run():
        freed: list[str] = []

        async def free(rid: str) -> None:
            freed.append(rid)

        leases = PrefillLeases(free, lease_s=30.0)
        assert not leases.release("peer:r1", "released")  # nothing held yet: remembered
        assert not leases.hold("peer:r1")  # the late grant: freed now, no timer
        assert leases.hold("peer:r2")  # an ordinary lease is held
        assert not leases.release("r3", "released") and leases.hold("r3")  # a prefill's id is never remembered
        await asyncio.sleep(0)
        held = len(leases)
        await leases.close()
        return freed, held

    freed, held = asyncio.run(run())
    assert freed[0] == "peer:r1" and held == 2


def test_the_pull_budget_bounds_pulls_and_bytes_but_lets_one_alone_through():
    b = PullBudget(max_pulls=2, max_bytes=100)
    assert b.take("a", 500)  # alone: allowed even over the byte bound
    assert not b.take("b", 1)  # the bytes are spent
    b.give("a")
    assert b.take("b", 60) and not b.take("c", 60) and b.take("c", 40)
    assert not b.take("d", 0)  # two in flight
    b.give("b")
    b.give("c")
    b.give("c")  # idempotent
    assert b.in_flight == 0 and b.bytes == 0 and b.refusals == 3
    assert not PullBudget(max_pulls=0, max_bytes=100).take("x", 1)  # 0: no pulls at all
