"""Routers: selection rules, tie-breaking, temperature, exact in-flight accounting, decision-time metric."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kvrelay.frontend.kv_index import KvIndex
from kvrelay.frontend.kv_router import KvRouter
from kvrelay.frontend.router import (
    BaseRouter,
    LeastLoadedRouter,
    NoWorkersError,
    RandomRouter,
    RoundRobinRouter,
    RouteRequest,
    WorkerState,
    make_router,
)
from kvrelay.kvbm.events import KvEvent
from kvrelay.kvbm.hashing import block_hashes, root_hash
from kvrelay.runtime.metrics import new_registry

BS = 16
ROOT = root_hash("test-model")
W4 = [WorkerState(worker_id=f"w{i}") for i in range(4)]


def req(rid: str, tokens: list[int]) -> RouteRequest:
    return RouteRequest(request_id=rid, block_hashes=block_hashes(tokens, BS, ROOT), num_prompt_tokens=len(tokens),
                        block_size=BS)


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


def overlap_router(index: KvIndex, **kw) -> KvRouter:
    """The overlap formula as it was before issue 27 (no speculative entries)."""
    return KvRouter(index, cost="overlap", speculative_ttl=0, **kw)


def store(index: KvIndex, worker: str, eid: int, hashes: list[int]) -> None:
    assert index.apply(KvEvent(worker_id=worker, event_id=eid, kind="stored", seq_hashes=hashes))


def test_route_request_blocks_include_the_partial_block() -> None:
    assert req("r", prompt(0, 32)).num_blocks == 2
    assert req("r", prompt(0, 33)).num_blocks == 3
    assert req("r", prompt(0, 5)).num_blocks == 1 and req("r", prompt(0, 5)).block_hashes == []


def test_no_workers() -> None:
    for router in (RoundRobinRouter(), RandomRouter(), LeastLoadedRouter(), KvRouter(KvIndex())):
        with pytest.raises(NoWorkersError):
            router.select(req("r", prompt(0, 10)), [])


def test_round_robin_cycles_in_worker_id_order() -> None:
    r = RoundRobinRouter()
    got = [r.select(req(f"r{i}", prompt(i, 20)), list(reversed(W4))).worker_id for i in range(8)]
    assert got == ["w0", "w1", "w2", "w3"] * 2


def test_random_is_seedable_and_uses_no_global_state() -> None:
    def picks(seed: int) -> list[str]:
        r = RandomRouter(rng=random.Random(seed))
        return [r.select(req(f"r{i}", prompt(i, 20)), W4).worker_id for i in range(50)]

    random.seed(1)
    a = picks(3)
    random.seed(2)
    assert picks(3) == a and len(set(a)) == 4


def test_least_loaded_uses_own_in_flight_and_reported_load() -> None:
    r = LeastLoadedRouter(rng=random.Random(0))
    got = Counter(r.select(req(f"r{i}", prompt(i, 20)), W4).worker_id for i in range(40))
    assert set(got.values()) == {10}  # nothing finished: a burst spreads exactly
    for i in range(40):
        r.on_finish(f"r{i}")
    busy = [WorkerState(worker_id="w0", active_requests=5), *W4[1:]]
    assert all(r.select(req(f"s{i}", prompt(i, 20)), busy).worker_id != "w0" for i in range(3))


def test_kv_router_prefers_the_longest_prefix() -> None:
    index = KvIndex()
    p = prompt(1, 160)  # 10 blocks
    h = req("x", p).block_hashes
    store(index, "w1", 1, h[:8])
    store(index, "w2", 1, h[:3])
    r = overlap_router(index, rng=random.Random(0))
    d = r.select(req("r1", p), W4)
    assert (d.worker_id, d.overlap_blocks, d.cost) == ("w1", 8, 2.0)
    d = KvRouter(index, rng=random.Random(0)).select(req("r1", p), W4)  # ttft: 2 blocks to compute
    assert (d.worker_id, d.overlap_blocks, d.prefill_tokens) == ("w1", 8, 32)
    assert d.cost == pytest.approx(32 / 20_000)


def test_kv_cost_trades_overlap_against_load() -> None:
    index = KvIndex()
    p = prompt(1, 160)  # 10 blocks
    store(index, "w0", 1, req("x", p).block_hashes[:8])
    loaded = [WorkerState(worker_id="w0", active_decode_blocks=7), WorkerState(worker_id="w1")]
    # w0: 1.0 * 2 + 7 = 9 < w1: 10 + 0
    assert overlap_router(index).select(req("a", p), loaded).worker_id == "w0"
    loaded[0] = WorkerState(worker_id="w0", active_decode_blocks=9)  # 11 > 10
    assert overlap_router(index).select(req("a", p), loaded).worker_id == "w1"
    assert overlap_router(index, overlap_weight=2.0).select(req("a", p), loaded).worker_id == "w0"  # 13 < 20
    assert overlap_router(index, overlap_weight=0.0).select(req("a", p), loaded).worker_id == "w1"  # pure load
    with pytest.raises(ValueError):
        overlap_router(index, overlap_weight=-1)


def test_kv_ties_go_to_fewer_requests_then_uniformly_at_random() -> None:
    index = KvIndex()
    workers = [WorkerState(worker_id="w0", active_requests=3), *W4[1:]]
    r = overlap_router(index, rng=random.Random(5))
    got = Counter()
    for i in range(3000):
        got[r.select(req(f"r{i}", prompt(i, 20)), workers).worker_id] += 1
        r.on_finish(f"r{i}")  # nothing in flight: every decision is a 3-way tie (w0 loses on requests)
    assert "w0" not in got and len(got) == 3
    assert all(900 < n < 1100 for n in got.values()), got


def test_kv_burst_counts_in_flight_requests_immediately() -> None:
    """Equal-size requests with no cache anywhere: a burst spreads exactly, no events needed."""
    r = KvRouter(KvIndex(), rng=random.Random(0))
    got = Counter(r.select(req(f"r{i}", prompt(i, 64)), W4).worker_id for i in range(100))
    assert set(got.values()) == {25}


def test_in_flight_counts_shared_blocks_once() -> None:
    r = KvRouter(KvIndex(), rng=random.Random(0))
    system = prompt(9, 64)  # 4 blocks
    one = [WorkerState(worker_id="w0")]
    r.select(req("a", system + prompt(1, 40)), one)  # 4 + 2 full + 1 partial
    r.select(req("b", system + prompt(2, 40)), one)
    assert r.inflight.requests("w0") == 2 and r.inflight.blocks("w0") == 4 + 3 + 3
    assert r.load(WorkerState(worker_id="w0", active_requests=1, active_decode_blocks=50)) == (2, 50)


def test_in_flight_accounting_never_drifts() -> None:
    rng = random.Random(11)
    r = KvRouter(KvIndex(), rng=random.Random(1))
    live: dict[str, str] = {}
    for i in range(5000):
        op = rng.random()
        if op < 0.5 or not live:
            rid = f"r{rng.randrange(300)}"  # ids repeat: a re-route (migration) replaces the old slot
            live[rid] = r.select(req(rid, prompt(rng.randrange(40), rng.randint(1, 90))), W4).worker_id
        elif op < 0.9:
            rid = rng.choice(sorted(live))
            r.on_finish(rid)
            r.on_finish(rid)  # idempotent
            del live[rid]
        else:
            r.on_finish(f"unknown{i}")
        assert len(r.inflight) == len(live)
        for w in W4:
            assert r.inflight.requests(w.worker_id) == sum(v == w.worker_id for v in live.values())
    for rid in list(live):
        r.on_finish(rid)
    assert len(r.inflight) == 0
    assert all(r.inflight.blocks(w.worker_id) == 0 and r.inflight.requests(w.worker_id) == 0 for w in W4)
    assert not r.inflight._reqs and not r.inflight._hashes and not r.inflight._partial


def test_temperature_samples_by_normalized_cost() -> None:
    index = KvIndex()
    p = prompt(1, 160)
    store(index, "w0", 1, req("x", p).block_hashes)  # w0 cost 1, the others 10
    workers = W4[:2]

    def share(temperature: float, n: int = 2000) -> float:
        r = overlap_router(index, temperature=temperature, rng=random.Random(3))
        hits = 0
        for i in range(n):
            hits += r.select(req(f"r{i}", p), workers).worker_id == "w0"
            r.on_finish(f"r{i}")
        return hits / n

    # normalized costs 0 and 1: P(w0) = 1 / (1 + exp(-1/T))
    assert share(1e-3) == 1.0
    assert abs(share(1.0) - 0.731) < 0.03
    assert abs(share(100.0) - 0.5025) < 0.04


def test_decision_time_histogram_on_the_given_registry() -> None:
    reg_a, reg_b = new_registry(), new_registry()
    ra = KvRouter(KvIndex(), registry=reg_a)
    rb = RoundRobinRouter(registry=reg_b)  # separate registries: no name clash
    for i in range(7):
        ra.select(req(f"r{i}", prompt(i, 30)), W4)
    rb.select(req("x", prompt(0, 30)), W4)
    assert reg_a.get_sample_value("kvrelay_router_decision_seconds_count", {"router": "kv"}) == 7
    assert reg_a.get_sample_value("kvrelay_router_decision_seconds_sum", {"router": "kv"}) > 0
    assert reg_b.get_sample_value("kvrelay_router_decision_seconds_count", {"router": "round-robin"}) == 1


def test_make_router() -> None:
    index = KvIndex()
    assert isinstance(make_router("kv", index=index, overlap_weight=2.0), KvRouter)
    for mode, cls in (("round-robin", RoundRobinRouter), ("random", RandomRouter),
                      ("least-loaded", LeastLoadedRouter)):
        r: BaseRouter = make_router(mode)
        assert isinstance(r, cls) and r.name == mode
    with pytest.raises(ValueError):
        make_router("kv")
    with pytest.raises(ValueError):
        make_router("sticky")


def test_tier_weights_credit_lower_tiers() -> None:
    index = KvIndex(tiers=("G1", "G2"))
    p = prompt(1, 160)
    h = req("x", p).block_hashes
    store(index, "w0", 1, h[:2])
    assert index.apply(KvEvent(worker_id="w1", event_id=1, kind="stored", tier="G2", seq_hashes=h))
    g1_only = overlap_router(index, rng=random.Random(0))
    assert g1_only.select(req("a", p), W4[:2]).worker_id == "w0"  # 8 < 10
    tiered = overlap_router(index, tier_weights={"G1": 1.0, "G2": 0.5})
    d = tiered.select(req("a", p), W4[:2])
    assert (d.worker_id, d.overlap_blocks, d.cost) == ("w1", 0, 5.0)  # 10 - 10 * 0.5
