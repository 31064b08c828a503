"""The kv router's expected-TTFT cost, speculative index entries and the learned prefill rate (issue 27)."""

from __future__ import annotations

import random

import pytest

from kvrelay.frontend.kv_index import KvIndex
from kvrelay.frontend.kv_router import KvRouter, fleet_rate
from kvrelay.frontend.prefill_rate import PrefillRate
from kvrelay.frontend.router import RouteRequest, WorkerState
from kvrelay.frontend.speculative_index import Held, SpeculativeIndex, held_prefix
from kvrelay.kvbm.events import KvEvent
from kvrelay.kvbm.hashing import block_hashes, root_hash

BS = 16
ROOT = root_hash("ttft-test")
W4 = [WorkerState(worker_id=f"w{i}") for i in range(4)]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def req(rid: str, tokens: list[int]) -> RouteRequest:
    return RouteRequest(request_id=rid, block_hashes=block_hashes(tokens, BS, ROOT), num_prompt_tokens=len(tokens),
                        block_size=BS)


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


def store(index: KvIndex, worker: str, eid: int, hashes: list[int], tier: str = "G1") -> None:
    assert index.apply(KvEvent(worker_id=worker, event_id=eid, kind="stored", tier=tier, seq_hashes=hashes))


def fixed_rate(tokens_per_s: float = 10_000.0) -> PrefillRate:
    return PrefillRate(tokens_per_s, min_samples=10**9)  # never leaves the prior


# -- speculative entries -------------------------------------------------------------------------------------
def test_speculative_entries_expire_after_ttl_unless_refreshed() -> None:
    clock = Clock()
    spec = SpeculativeIndex(ttl=2.0, clock=clock)
    spec.add("w0", [1, 2, 3])
    clock.t += 1.5
    spec.add("w0", [3])  # routed again: 3 lives on
    spec.add("w1", [1])
    assert set(spec.holders(1)) == {"w0", "w1"}
    clock.t += 1.0  # w0's first entries are 2.5 s old
    spec.prune()
    assert set(spec.holders(1)) == {"w1"} and not spec.holders(2) and set(spec.holders(3)) == {"w0"}
    clock.t += 5.0
    spec.prune()
    assert len(spec) == 0 and not spec._queue  # bounded: nothing outlives its ttl


def test_a_confirmed_speculation_leaves_the_index_authoritative() -> None:
    clock = Clock()
    index, spec = KvIndex(), SpeculativeIndex(ttl=10.0, clock=clock)
    h = req("x", prompt(1, 64)).block_hashes
    spec.add("w0", h)
    assert held_prefix(h, index, spec, {"G1": 1.0})["w0"] == Held(4, 4, 4.0)
    store(index, "w0", 1, h)
    held_prefix(h, index, spec, {"G1": 1.0})  # the lookup finds both: the speculation is dropped
    assert len(spec) == 0
    assert index.apply(KvEvent(worker_id="w0", event_id=2, kind="removed", seq_hashes=h[2:]))
    assert held_prefix(h, index, spec, {"G1": 1.0})["w0"] == Held(2, 2, 2.0, 2)  # the eviction shows at once


def test_held_prefix_chains_index_speculation_and_lower_tiers() -> None:
    index = KvIndex(tiers=("G1", "G2"))
    spec = SpeculativeIndex(ttl=10.0)
    h = req("x", prompt(2, 160)).block_hashes  # 10 blocks
    store(index, "w0", 1, h[:4])
    spec.add("w0", h[4:6])  # the previous turn, routed but not yet confirmed
    store(index, "w0", 2, h[6:8], tier="G2")
    store(index, "w1", 1, h[1:], tier="G1")  # no first block: holds no prefix
    held = held_prefix(h, index, spec, {"G1": 1.0, "G2": 0.5})
    assert held == {"w0": Held(8, 6, 7.0, 4)}  # confirmed: the index's 4, not the speculative 2


def test_two_turns_routed_close_together_go_to_the_same_worker() -> None:
    """The second turn arrives before any KV event of the first: its prefix is only speculatively held."""
    r = KvRouter(KvIndex(), rng=random.Random(0), prefill_rate=fixed_rate())
    turn1 = prompt(3, 400)
    first = r.select(req("t1", turn1), W4).worker_id
    r.on_first_token("t1")
    r.on_finish("t1")
    assert r.select(req("t2", turn1 + prompt(4, 50)), W4).worker_id == first
    blind = KvRouter(KvIndex(), rng=random.Random(1), prefill_rate=fixed_rate(), speculative_ttl=0)
    got = set()
    for i in range(8):  # without speculation the second turn lands anywhere
        blind.select(req(f"a{i}", turn1), W4)
        blind.on_finish(f"a{i}")
        got.add(blind.select(req(f"b{i}", turn1 + prompt(4, 50)), W4).worker_id)
        blind.on_finish(f"b{i}")
    assert len(got) > 1


# -- the expected-TTFT cost ------------------------------------------------------------------------------------
def test_a_conversation_stays_with_its_history_until_the_queue_there_outweighs_it() -> None:
    index = KvIndex()
    history = prompt(5, 800)  # 50 blocks cached on w0
    store(index, "w0", 1, req("x", history).block_hashes)
    ask = history + prompt(6, 40)
    r = KvRouter(index, rng=random.Random(0), prefill_rate=fixed_rate(), speculative_ttl=0, balance=0,
                 clock=Clock())
    # Decoding requests on w0 do not delay a prefill much: the history wins although w0 is busier (the
    # overlap formula at weight 2 moves it: 2 x 3 uncached blocks + 300 active blocks > 2 x 53).
    busy = [WorkerState(worker_id="w0", active_requests=3, active_decode_blocks=300), *W4[1:]]
    d = r.select(req("a", ask), busy)
    assert (d.worker_id, d.prefill_tokens) == ("w0", 40)
    r.on_first_token("a")
    # Prompts queued for prefill on w0 (no first token yet) do delay it: past 840 - 40 tokens, it moves.
    for i in range(3):
        r.inflight.add_entry(f"q{i}", "w0", [], 0, 250)
    assert r.select(req("b", ask), busy).worker_id == "w0"  # 750 + 40 < 840
    r.on_finish("b")
    r.inflight.add_entry("q3", "w0", [], 0, 100)
    assert r.select(req("c", ask), busy).worker_id != "w0"  # 850 + 40 > 840


def test_a_burst_spreads_on_queued_prefill_and_the_first_token_releases_it() -> None:
    r = KvRouter(KvIndex(), rng=random.Random(0), prefill_rate=fixed_rate())
    got = [r.select(req(f"r{i}", prompt(10 + i, 300)), W4).worker_id for i in range(8)]
    assert sorted(got.count(w.worker_id) for w in W4) == [2, 2, 2, 2]
    assert r.inflight.queued_prefill("w0") == 600
    for i in range(8):
        r.on_first_token(f"r{i}")
        r.on_first_token(f"r{i}")  # idempotent
    assert all(r.inflight.queued_prefill(w.worker_id) == 0 for w in W4)
    assert len(r.inflight) == 8  # still decoding: only the prefill queue emptied


def test_queued_work_is_the_last_report_plus_what_was_routed_since() -> None:
    """Requests routed before the worker's last load report are in its waiting count (if still waiting);
    those routed since are counted from the router's own accounting until their first token."""
    clock = Clock()
    r = KvRouter(KvIndex(), rng=random.Random(0), prefill_rate=fixed_rate(1000.0), clock=clock)
    r.select(req("a", prompt(20, 500)), W4[:1])
    clock.t += 1.0
    r.select(req("b", prompt(21, 300)), W4[:1])
    assert r.inflight.queued_prefill("w0") == 800
    assert r.inflight.queued_prefill("w0", since=clock.t - 0.5) == 300
    # A report taken 0.5 s ago saying nothing waits: only b (routed after it) is queued work.
    seen = WorkerState(worker_id="w0", waiting_requests=0, report_age=0.5)
    terms = r.ttft.terms("w0", num_tokens=16, block_size=BS, held=Held(0, 0, 0.0),
                         queued_inflight=r.inflight.queued_prefill("w0", since=clock.t - seen.report_age),
                         waiting_reported=seen.waiting_requests, active=2, report_age=seen.report_age)
    assert terms.queued == 300


def test_lower_tier_blocks_cost_their_onboarding() -> None:
    index = KvIndex(tiers=("G1", "G2"))
    p = prompt(7, 320)  # 20 blocks
    h = req("x", p).block_hashes
    store(index, "w0", 1, h[:5])
    store(index, "w1", 1, h, tier="G2")
    r = KvRouter(index, tier_weights={"G1": 1.0, "G2": 0.5}, prefill_rate=fixed_rate(), speculative_ttl=0)
    d = r.select(req("a", p), W4[:2])
    # w0: 240 tokens to compute; w1: 1 token + 20 blocks x 16 x 0.5 onboarding = 161
    assert (d.worker_id, d.prefill_tokens) == ("w1", 1)
    assert d.cost == pytest.approx(161 / 10_000.0)


def test_the_balance_term_spreads_a_shared_prefix_beyond_the_zone() -> None:
    """Requests sharing a short cached prefix (a system prompt): the worker holding it takes them while
    its in-flight count stays within 1.5x the mean + 2; beyond, each extra request costs a mean prefill,
    so they spread. A long hot prefix (2,000 tokens, a request computing 20) outweighs that: there the
    worker's reported waiting requests (queued work) are what spreads it (hot-spot simulation)."""
    index = KvIndex()
    system = prompt(8, 160)
    store(index, "w0", 1, req("x", system).block_hashes)
    r = KvRouter(index, rng=random.Random(0), prefill_rate=fixed_rate())
    for i in range(40):  # decoding requests: their prefill is done, they only count as in flight
        r.select(req(f"r{i}", system + prompt(100 + i, 60)), W4)
        r.on_first_token(f"r{i}")
    per_worker = [r.inflight.requests(w.worker_id) for w in W4]
    assert sum(per_worker) == 40 and max(per_worker) <= 1.5 * 10 + 2 + 1, per_worker
    assert sum(1 for n in per_worker if n) >= 3, per_worker
    unguarded = KvRouter(index, rng=random.Random(0), prefill_rate=fixed_rate(), balance=0)
    for i in range(40):
        unguarded.select(req(f"r{i}", system + prompt(100 + i, 60)), W4)
        unguarded.on_first_token(f"r{i}")
    assert unguarded.inflight.requests("w0") == 40


def test_bad_options() -> None:
    with pytest.raises(ValueError):
        KvRouter(KvIndex(), cost="fastest")
    with pytest.raises(ValueError):
        KvRouter(KvIndex(), balance=-1)
    with pytest.raises(ValueError):
        PrefillRate(0)


# -- the learned prefill rate ----------------------------------------------------------------------------------
def test_prefill_rate_fits_the_slope_and_ignores_the_fixed_overhead() -> None:
    rate = PrefillRate(prior=1000.0, per_worker=True)
    rng = random.Random(0)
    for _ in range(200):
        tokens = rng.randint(50, 4000)
        rate.observe("w0", tokens, 0.020 + tokens / 40_000 * rng.uniform(0.95, 1.05))
    assert rate.rate("w0") == pytest.approx(40_000, rel=0.05)
    assert rate.rate("w1") == 1000.0  # no samples: the prior
    rate.observe("w1", 100, 0.0)  # nonsense samples are dropped
    rate.observe("w1", float("nan"), 1.0)
    assert rate.rate("w1") == 1000.0


def test_prefill_rate_keeps_the_prior_without_a_slope_and_clamps() -> None:
    rate = PrefillRate(prior=1000.0)
    for _ in range(50):
        rate.observe("w0", 500, 0.1)  # all alike: no slope to fit
    assert rate.rate("w0") == 1000.0
    fast = PrefillRate(prior=1000.0)
    for i in range(50):
        fast.observe("w0", 100 + 100 * (i % 5), 0.01 + 1e-9 * i)  # flat: overhead only
    assert fast.rate("w0") == 100_000.0  # clamped to 100x the prior


def test_prefill_rate_is_one_fit_over_all_workers_by_default() -> None:
    rate = PrefillRate(prior=1000.0)
    for i in range(40):
        rate.observe(f"w{i % 4}", 100 * (1 + i % 7), 100 * (1 + i % 7) / 20_000)
    assert [rate.rate(f"w{i}") for i in range(5)] == [pytest.approx(20_000)] * 5


def test_the_router_learns_the_rate_from_first_tokens() -> None:
    r = KvRouter(KvIndex(), rng=random.Random(0), prefill_rate=PrefillRate(prior=1000.0))
    for i in range(30):
        n = 100 + 50 * (i % 9)
        r.select(req(f"r{i}", prompt(200 + i, n)), W4)
        r.on_first_token(f"r{i}", seconds=0.005 + n / 50_000, cached_tokens=0)
        r.on_finish(f"r{i}")
    assert r.ttft.rate.rate("w0") == pytest.approx(50_000, rel=0.1)


def test_reported_waiting_counts_as_queued_work_drained_since_the_report() -> None:
    r = KvRouter(KvIndex(), prefill_rate=fixed_rate(1000.0), clock=Clock())
    fresh = r.ttft.terms("w0", num_tokens=16, block_size=BS, held=Held(0, 0, 0.0), queued_inflight=0,
                         waiting_reported=2, active=2, report_age=0.0)
    assert fresh.queued == 2 * 256.0  # the prior mean of tokens a request computes
    old = r.ttft.terms("w0", num_tokens=16, block_size=BS, held=Held(0, 0, 0.0), queued_inflight=0,
                       waiting_reported=2, active=2, report_age=0.4)
    assert old.queued == pytest.approx(112.0)


def test_a_reported_prefill_rate_replaces_the_learned_one() -> None:
    """Workers measure their prefill rate at the engine (LoadMetrics.prefill_rate), and the router uses
    it instead of the learned one; with no report it falls back to the learned rate."""
    r = KvRouter(KvIndex(), prefill_rate=fixed_rate(1000.0), clock=Clock())
    terms = r.ttft.terms("w0", num_tokens=1000, block_size=BS, held=Held(0, 0, 0.0), queued_inflight=0,
                         waiting_reported=0, active=0, reported_rate=4000.0)
    assert terms.rate == 4000.0 and terms.seconds == pytest.approx(1000 / 4000.0)
    assert r.ttft.terms("w0", num_tokens=1000, block_size=BS, held=Held(0, 0, 0.0), queued_inflight=0,
                        waiting_reported=0, active=0).rate == 1000.0
    # One rate for all candidates, the median of what they report: identical workers report different
    # rates for different prompt mixes, and that must not pull work towards one of them.
    ws = [WorkerState(worker_id=f"w{i}", prefill_rate=r, report_age=0.0) for i, r in enumerate((1e3, 4e3, 9e3))]
    assert fleet_rate(ws) == 4000.0 and fleet_rate(W4) == 0.0
    idle_slow, busy_fast = (WorkerState(worker_id="slow", prefill_rate=1000.0, report_age=0.0),
                            WorkerState(worker_id="fast", prefill_rate=8000.0, waiting_requests=1, report_age=0.0))
    assert r.select(req("a", prompt(7, 1000)), [idle_slow, busy_fast]).worker_id == "slow"


def test_a_loaded_holder_is_passed_over_with_a_pull_plan_and_an_idle_one_is_not() -> None:
    """The cluster KV pool: another worker's G1 blocks count `peer_weight` for whoever pulls them, so a
    conversation leaves a holder only when the holder's queue outweighs the pull, and the decision
    names the holder to pull from."""
    index = KvIndex()
    p = prompt(11, 64 * BS)
    store(index, "w0", 1, block_hashes(p, BS, ROOT))
    r = KvRouter(index, prefill_rate=fixed_rate(10_000.0), peer_weight=0.8, speculative_ttl=0, clock=Clock())
    d = r.select(req("a", p), W4)
    assert d.worker_id == "w0" and d.peer_id == ""  # idle holder: it computes nothing
    r.on_finish("a")
    busy = [WorkerState(worker_id="w0", waiting_requests=8, report_age=0.0), *W4[1:]]
    d = r.select(req("b", p), busy)  # 8 x 256 queued tokens at w0 vs 0.2 x 1,008 pulled elsewhere
    assert d.worker_id != "w0" and d.peer_id == "w0" and d.peer_blocks == 64
    off = KvRouter(index, prefill_rate=fixed_rate(10_000.0), speculative_ttl=0, clock=Clock())
    assert off.select(req("c", p), busy).peer_id == ""  # peer pulls off (weight 0): no plan


def test_a_burst_sharing_a_new_prefix_pulls_from_the_worker_routed_it_first() -> None:
    """Prompts sharing a prefix nobody has computed yet, routed one after another: every worker routed one
    holds it speculatively, but only the first computes it (the others pull it); each later prompt names
    the first as its peer, never one that is itself pulling (a chain of waits, or a lease of nothing), and
    a second prompt on a worker still pulling it names the first too (else it computes the prefix)."""
    index, clock = KvIndex(), Clock()
    shared = prompt(12, 16 * BS)
    r = KvRouter(index, prefill_rate=fixed_rate(10_000.0), peer_weight=0.8, speculative_ttl=10.0, clock=clock)
    first = r.select(req("r0", shared + prompt(100, BS)), W4)
    for i in range(1, 8):
        clock.t += 0.001
        d = r.select(req(f"r{i}", shared + prompt(100 + i, BS)), W4)
        # every prompt elsewhere carries the plan, also one sent to a worker that holds the prefix only
        # because an earlier prompt of the burst was routed (and is pulling it) there
        assert d.worker_id == first.worker_id or (d.peer_id == first.worker_id and d.peer_blocks == 16), (i, d)
    # once a later holder's events confirm the prefix and the first's do not yet, the confirmed one lends
    other = next(w.worker_id for w in W4 if w.worker_id != first.worker_id)
    store(index, other, 1, block_hashes(shared, BS, ROOT))
    held = held_prefix(block_hashes(shared + prompt(200, BS), BS, ROOT), index, r.speculative, {"G1": 1.0})
    assert r._best_holder(held, block_hashes(shared + prompt(200, BS), BS, ROOT)) == (other, 16)
