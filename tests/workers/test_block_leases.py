"""`BlockLeases` (the cluster KV pool's lender side): a lease over G1's cached run grows by blocks G2
fills; only the leading run that arrived is kept and published; a lease released while G2 writes frees
its blocks only once the write ended; every block is free again after."""

from __future__ import annotations

from kvrelay.workers.core.block_leases import BlockLeases
from kvrelay.workers.core.kv_cache import KvCache

HASHES = [101, 102, 103, 104, 105, 106]


def _cache_with_first_two() -> KvCache:
    kv = KvCache(16)
    blocks = kv.allocate(2)
    kv.publish(blocks, HASHES, 0, 2)
    kv.release(reversed(blocks))  # cached, free: what a finished request leaves
    kv.drain_events()
    return kv


def test_a_lease_grows_by_what_g2_filled_up_to_the_first_block_that_did_not_arrive():
    kv = _cache_with_first_two()
    leases = BlockLeases(kv)
    g1 = leases.lease("peer:a", HASHES)
    assert len(g1) == 2 and leases.pinned == 2
    fresh = leases.grow("peer:a", 4)
    assert len(fresh) == 4 and leases.pinned == 6 and leases.grow("peer:a", 1) == []  # one growth at a time
    lent = leases.filled("peer:a", HASHES, [True, True, False, True])
    assert lent == g1 + fresh[:2] and leases.pinned == 4
    assert [h in kv.cached for h in HASHES] == [True] * 4 + [False] * 2  # published in G1, chained
    stored = [e for e in kv.drain_events() if e.kind == "stored"]
    assert stored[-1].seq_hashes == HASHES[2:4] and stored[-1].parent_hash == HASHES[1]
    assert leases.lent_blocks == 4 and leases.lent_from_g2 == 2
    assert leases.release("peer:a") and leases.pinned == 0 and kv.num_free == 16


def test_a_lease_released_while_g2_writes_frees_its_blocks_once_the_write_ended():
    kv = _cache_with_first_two()
    leases = BlockLeases(kv)
    leases.lease("peer:b", HASHES)
    fresh = leases.grow("peer:b", 3)
    assert leases.release("peer:b")
    assert kv.num_free == 16 - len(fresh)  # the G1 run is free; the blocks G2 is writing are not
    assert leases.filled("peer:b", HASHES, [True] * 3) == []
    assert kv.num_free == 16 and leases.pinned == 0 and not any(h in kv.cached for h in HASHES[2:])


def test_a_lease_of_blocks_only_g2_holds_and_none_arrived_leaves_nothing():
    kv = KvCache(8)
    leases = BlockLeases(kv)
    assert leases.lease("peer:c", HASHES) == []
    assert len(leases.grow("peer:c", 2)) == 2
    assert leases.filled("peer:c", HASHES, [False, False]) == []
    assert kv.num_free == 8 and leases.pinned == 0 and not leases.release("peer:c")
