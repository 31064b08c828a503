"""KvIndex: events, gaps, snapshots, worker removal, prefix overlap (checked against a brute-force model)."""

from __future__ import annotations

import random

from kvrelay.frontend.kv_index import KvIndex
from kvrelay.kvbm.events import KvEvent, KvSnapshot
from kvrelay.kvbm.hashing import block_hashes, root_hash

ROOT = root_hash("test-model")


def chain(tokens: list[int]) -> list[int]:
    return block_hashes(tokens, 4, ROOT)


def stored(w: str, eid: int, hashes: list[int], tier: str = "G1") -> KvEvent:
    return KvEvent(worker_id=w, event_id=eid, kind="stored", tier=tier, seq_hashes=hashes)


def removed(w: str, eid: int, hashes: list[int], tier: str = "G1") -> KvEvent:
    return KvEvent(worker_id=w, event_id=eid, kind="removed", tier=tier, seq_hashes=hashes)


def assert_empty(index: KvIndex) -> None:
    assert index.num_hashes() == 0 and not index._held and all(not h for h in index._holders.values())


def test_overlap_is_the_leading_run_per_worker() -> None:
    h = chain(list(range(40)))  # 10 blocks
    index = KvIndex()
    assert index.apply(stored("a", 1, h[:6]))
    assert index.apply(stored("b", 1, h[:3]))
    assert index.apply(stored("c", 1, h[1:8]))  # lacks block 0: no prefix at all
    assert index.apply(stored("d", 1, h[:2] + h[3:9]))  # a hole at block 2 ends its prefix
    assert index.overlap(h) == {"a": 6, "b": 3, "d": 2}
    assert index.overlap(h[:1]) == {"a": 1, "b": 1, "d": 1}
    assert index.overlap([]) == {}
    assert index.overlap(chain(list(range(100, 140)))) == {}
    # A different salt/model: same tokens, other hashes, no overlap.
    assert index.overlap(block_hashes(list(range(40)), 4, root_hash("test-model", "tenant"))) == {}


def test_removed_and_cleared_shrink_the_index() -> None:
    h = chain(list(range(40)))
    index = KvIndex()
    index.apply(stored("a", 1, h))
    index.apply(stored("b", 1, h[:5]))
    assert index.apply(removed("a", 2, h[4:6]))
    assert index.overlap(h) == {"a": 4, "b": 5}
    assert index.apply(removed("a", 3, [12345]))  # unknown hash: ignored
    assert index.apply(KvEvent(worker_id="b", event_id=2, kind="cleared", tier="G1"))
    assert index.overlap(h) == {"a": 4}
    assert index.blocks("b") == frozenset()
    index.apply(removed("a", 4, h))
    assert_empty(index)
    assert index.last_event_id("a") == 4 and index.workers() == {"a", "b"}


def test_gaps_are_detected_and_not_applied() -> None:
    h = chain(list(range(40)))
    index = KvIndex()
    assert index.apply(stored("a", 1, h[:1]))
    assert index.apply(stored("a", 2, h[1:2]))
    assert not index.apply(stored("a", 4, h[2:4]))  # 3 is missing
    assert index.overlap(h) == {"a": 2} and index.last_event_id("a") == 2
    assert not index.apply(stored("a", 5, h[4:5]))  # still a gap: nothing applied out of order
    assert index.apply(stored("a", 2, h))  # stale duplicate: ignored, not a gap
    assert index.overlap(h) == {"a": 2}
    assert index.apply(stored("a", 3, h[2:3]))
    assert index.overlap(h) == {"a": 3}


def test_first_event_of_an_unknown_worker_must_be_1() -> None:
    index = KvIndex()
    assert not index.apply(stored("late", 7, [1, 2]))  # the router joined after the worker
    assert index.workers() == set() and index.num_hashes() == 0
    assert index.apply(stored("new", 1, [1, 2]))


def test_snapshot_replaces_state_and_makes_older_events_stale() -> None:
    h = chain(list(range(40)))
    index = KvIndex()
    index.apply(stored("a", 1, h[:2]))
    assert not index.apply(stored("a", 9, h[:8]))
    index.apply_snapshot(KvSnapshot(worker_id="a", last_event_id=8, tiers={"G1": h[:5], "G3": h}))
    assert index.overlap(h) == {"a": 5}
    assert index.blocks("a", "G3") == frozenset()  # G3 not indexed by default
    for eid in range(1, 9):  # buffered events the snapshot already reflects
        assert index.apply(removed("a", eid, h))
    assert index.overlap(h) == {"a": 5}
    assert index.apply(stored("a", 9, h[5:7]))
    assert index.overlap(h) == {"a": 7}
    # A snapshot is authoritative even when it is older than what was applied.
    index.apply_snapshot(KvSnapshot(worker_id="a", last_event_id=3, tiers={"G1": h[:1]}))
    assert index.overlap(h) == {"a": 1} and index.last_event_id("a") == 3


def test_remove_worker_clears_it_and_ignores_its_late_events() -> None:
    h = chain(list(range(40)))
    index = KvIndex()
    index.apply(stored("a", 1, h))
    index.apply(stored("b", 1, h[:3]))
    index.remove_worker("a")
    assert index.overlap(h) == {"b": 3} and "a" not in index.workers()
    assert index.apply(stored("a", 2, h))  # a late event of the dead worker: not a gap, not applied
    assert index.apply(stored("a", 1, h))
    assert index.overlap(h) == {"b": 3}
    index.remove_worker("b")
    assert_empty(index)
    index.add_worker("a")  # discovery says it is back: events count again (state starts over: gap)
    assert not index.apply(stored("a", 3, h))
    index.remove_worker("c", tombstone=False)  # unknown worker: a no-op
    index.remove_worker("a", tombstone=False)
    assert index.apply(stored("a", 1, h[:2])) and index.overlap(h) == {"a": 2}


def test_tombstones_are_bounded() -> None:
    index = KvIndex(max_tombstones=3)
    for i in range(10):
        index.remove_worker(f"w{i}")
    assert list(index._tombstones) == ["w7", "w8", "w9"]


def test_untracked_tiers_advance_the_sequence_only() -> None:
    h = chain(list(range(40)))
    index = KvIndex()  # G1 only
    assert index.apply(stored("a", 1, h, tier="G2"))
    assert index.overlap(h) == {} and index.overlap(h, tier="G2") == {}
    assert index.apply(stored("a", 2, h[:2]))  # no gap: event 1 counted
    assert index.overlap(h) == {"a": 2}


def test_weighted_overlap_across_tiers() -> None:
    h = chain(list(range(40)))
    index = KvIndex(tiers=("G1", "G2"))
    index.apply(stored("a", 1, h[:3]))
    index.apply(stored("a", 2, h[:6], tier="G2"))  # blocks 0-2 in both tiers: best weight counts
    index.apply(stored("b", 1, h[1:5]))  # no block 0 anywhere: nothing
    index.apply(stored("c", 1, h[:2], tier="G2"))
    index.apply(stored("c", 2, h[2:4]))
    got = index.weighted_overlap(h, {"G1": 1.0, "G2": 0.5})
    assert got == {"a": 3 + 3 * 0.5, "c": 2 * 0.5 + 2}
    assert index.weighted_overlap(h, {"G1": 1.0}) == {"a": 3.0}
    assert index.weighted_overlap(h, {"G2": 0.5, "G4": 1.0}) == {"a": 3.0, "c": 1.0}
    assert index.overlap(h, tier="G2") == {"a": 6, "c": 2}


def test_matches_a_brute_force_model_under_random_events() -> None:
    rng = random.Random(7)
    docs = [chain([d] * 4 + list(range(d * 100, d * 100 + 60))) for d in range(6)]  # 16 blocks each
    universe = [h for d in docs for h in d]
    index, model, next_id = KvIndex(), {}, {}
    workers = [f"w{i}" for i in range(5)]
    for _ in range(3000):
        w = rng.choice(workers)
        op = rng.random()
        if op < 0.02:
            index.remove_worker(w, tombstone=False)
            model.pop(w, None)
            next_id.pop(w, None)
            continue
        eid = next_id.get(w, 0) + 1
        next_id[w] = eid
        held = model.setdefault(w, set())
        if op < 0.55:
            d = rng.choice(docs)
            hashes = d[: rng.randint(1, len(d))]
            assert index.apply(stored(w, eid, hashes))
            held.update(hashes)
        elif op < 0.97:
            hashes = rng.sample(universe, rng.randint(1, 20))
            assert index.apply(removed(w, eid, hashes))
            held.difference_update(hashes)
        else:
            assert index.apply(KvEvent(worker_id=w, event_id=eid, kind="cleared", tier="G1"))
            held.clear()
        q = rng.choice(docs)
        expected = {}
        for v, hs in model.items():
            n = next((i for i, h in enumerate(q) if h not in hs), len(q))
            if n:
                expected[v] = n
        assert index.overlap(q) == expected
    # Memory is exactly what the workers hold.
    assert index.num_hashes() == len(set().union(*model.values()))
    for w in workers:
        index.remove_worker(w)
    assert_empty(index)
