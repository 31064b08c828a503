"""Routing quality (issue #4 acceptance) on a discrete-event simulation with a virtual clock.

Model. 4 simulated workers, each with an LRU prefix cache of `capacity` blocks (block size 16). A
request routed at time t looks up its prompt's chained block hashes (kvbm.hashing) in the chosen
worker's cache: its *cached tokens* are 16 x the leading blocks found there. The worker computes the
prompt (`PREFILL_S_PER_TOKEN` per uncached token) and stores its blocks, decodes the reply
(`DECODE_S_PER_TOKEN` per token), stores the blocks of prompt + reply and finishes (the router is
told). Every insert and eviction is a real `KvEvent` that reaches the real `KvIndex` `EVENT_DELAY_S`
later. Workers batch without limit, so requests overlap and the router sees in-flight requests the
index does not reflect yet; workers report their load every `METRICS_PERIOD_S` (stale in between).

Hit rate = sum of cached tokens / sum of prompt tokens.
Best possible ("oracle") hit rate: per request, 16 x the leading full blocks of its prompt that *any*
earlier request had computed when it arrived (prompt blocks once its prefill ended, reply blocks once
it finished): one unbounded cache shared by all workers, with the simulated timing. No router can do
better (asserted).

Multi-turn: 32 users x 6 turns; every prompt starts with a shared 200-token system prompt; each turn
appends a user message (40-60 tokens) to the user's history, and then the reply (40-60 tokens).
Turn t of all users arrives before turn t+1: users arrive in a random order with exponential gaps
(mean `mean_gap_s`; 20 ms: the 32 conversations run concurrently, as in a multi-turn benchmark with
concurrency 32), and a user whose previous turn has not finished arrives when it finishes.
Single-turn: 1000 requests with random prompts (no shared prefix, or a shared chat-template header),
in bursts of 50 arriving at the same instant, a burst every 2 s.
"""

from __future__ import annotations

import statistics

import pytest

from tests.frontend.routing_sim import MultiTurn, run_hot_spot, run_multi_turn, run_single_turn

BASELINES = ("round-robin", "random", "least-loaded")
# The kv router's default cost is the expected TTFT (issue 27). The overlap formula before it, for comparison:
# at overlap_weight 1.0, 2 seeds in 20 fell below 0.9x best on this workload (0.871, 0.885); at 2.0 (its
# default) the worst of 20 is 0.936.
KV_WEIGHT = 2.0
KV = "kv (ttft)"
OVERLAP = {"cost": "overlap", "speculative_ttl": 0}  # the kv router as it was before issue 27


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_turn_prefix_hit_rate(seed: int) -> None:
    wl = MultiTurn()
    results = {m: run_multi_turn(m, wl, seed=seed) for m in BASELINES}
    results[KV] = run_multi_turn("kv", wl, seed=seed)
    for weight in (KV_WEIGHT, 1.0):
        results[f"kv, weight {weight:g}"] = run_multi_turn("kv", wl, seed=seed, overlap_weight=weight, **OVERLAP)
    best = results[KV].best_hit_rate
    kv, rr = results[KV].hit_rate, results["round-robin"].hit_rate
    print(f"\nmulti-turn (seed {seed}) {wl}\n  best possible hit rate: {best:.3f} ({best / rr:.2f}x round-robin)")
    for m, st in results.items():
        print(f"  {m:>13}: hit rate {st.hit_rate:.3f} = {st.hit_rate / best:.3f} of best = "
              f"{st.hit_rate / rr:.2f}x round-robin; requests per worker {sorted(st.per_worker.values())}")
    # Every router faces the same workload (the oracle differs only through timing) and none beats it.
    assert all(abs(st.best_hit_rate - best) < 0.02 for st in results.values())
    assert all(st.hit_rate <= st.best_hit_rate + 1e-9 for st in results.values())
    assert kv >= 0.9 * best
    # The issue also asks for kv >= 3x round-robin. No router can reach that here: even the oracle is
    # ~1.4-2.2x round-robin (also with long replies and short system prompts), because round-robin hits
    # the shared system prompt on every worker and often lands where an earlier part of the user's
    # history is cached. What we hold the kv router to instead is a bar the other policies fail.
    assert kv >= 1.3 * rr, f"kv only {kv / rr:.2f}x round-robin"
    assert results["least-loaded"].hit_rate < 1.3 * rr and results["random"].hit_rate < 1.3 * rr
    # Spread: the ttft router may leave a worker nearly idle here (decodes batch at no cost in this model,
    # so recomputing the system prompt on a fourth worker only delays a first token), but its balance term
    # keeps every worker within 2x the mean (measured 1.00-1.46 over 3 seeds, with and without a prefill
    # queue; 2.3-4.0 without it); the overlap formula spreads by decode load (max/min <= 1.02).
    assert results[KV].max_over_mean <= 2.0
    assert results["kv, weight 2"].spread <= 1.5


def test_multi_turn_lower_concurrency_report() -> None:
    """Informational (printed; only sanity asserted): how the cost trades hit rate for balance when
    fewer conversations overlap. At ~2 requests per worker, one request's blocks of load imbalance
    outweigh a short history, so conversations move; a larger overlap_weight keeps them, at the
    price of concentrating traffic on the workers holding the system prompt when load is low."""
    print("\nkv router at lower concurrency (seed 0): hit rate / best, max/min requests per worker")
    for gap in (0.05, 0.1, 0.3, 1.0):
        wl = MultiTurn(mean_gap_s=gap)
        row = []
        for weight in (1.0, 2.0, 3.0, None):
            st = run_multi_turn("kv", wl) if weight is None else run_multi_turn("kv", wl, overlap_weight=weight,
                                                                                  **OVERLAP)
            row.append(f"{'ttft' if weight is None else f'w={weight:g}'}: {st.hit_rate / st.best_hit_rate:.3f}, "
                       f"{st.spread:.2f}")
            assert st.hit_rate <= st.best_hit_rate + 1e-9
        print(f"  mean gap {gap:>4}s: " + " | ".join(row))


def test_multi_turn_three_x_round_robin_report() -> None:
    """Informational (printed; only sanity asserted): where "kv >= 3x round-robin" could come from.
    Round-robin always hits the shared system prompt and, with probability ~1/4, lands where the
    user's previous turn is cached, so its hit rate only falls far below the oracle's when the system
    prompt is short *and* the per-worker cache cannot hold every conversation (LRU then drops what
    round-robin scattered). With longer turns (100-300-token messages, 150-350-token replies) a sweep
    (5 seeds, overlap weights 2-4) found kv >= 3x round-robin together with >= 0.9x best only at the
    edge: a 32-token system prompt and 1,200 blocks per worker, and there in 1-4 seeds of 5 depending
    on the weight (kv/rr 2.5-3.6x). Tighter caches squeeze the kv router below 0.9x best too; longer system prompts lift
    round-robin. So 3x is a property of a workload picked for it, not a bar a router can be held to."""
    print("\nsystem tokens, blocks per worker: best/rr, kv/best, kv/rr (longer turns, seed 0)")
    for system, capacity in ((200, 2000), (64, 1500), (32, 1200)):
        wl = MultiTurn(system_tokens=system, capacity=capacity, user_tokens=(100, 300), reply_tokens=(150, 350))
        kv, rr = run_multi_turn("kv", wl), run_multi_turn("round-robin", wl)
        best = kv.best_hit_rate
        print(f"  {system:>4}, {capacity:>5}: {best / rr.hit_rate:.2f}x, {kv.hit_rate / best:.3f}, "
              f"{kv.hit_rate / rr.hit_rate:.2f}x")
        assert kv.hit_rate <= best + 1e-9 and rr.hit_rate <= rr.best_hit_rate + 1e-9


@pytest.mark.parametrize(("template", "seed"), [(0, 0), (32, 1)])
def test_single_turn_load_spread(template: int, seed: int) -> None:
    results = {m: run_single_turn(m, template=template, seed=seed) for m in BASELINES}
    results[KV] = run_single_turn("kv", template=template, seed=seed)
    for weight in (KV_WEIGHT, 1.0):
        results[f"kv, weight {weight:g}"] = run_single_turn("kv", template=template, seed=seed,
                                                            overlap_weight=weight, **OVERLAP)
    print(f"\nsingle-turn, 1000 random prompts in bursts of 50, shared header {template} tokens (seed {seed})")
    for m, st in results.items():
        print(f"  {m:>13}: max/min requests per worker {st.spread:.3f} {sorted(st.per_worker.values())}")
    assert results[KV].spread <= 1.5
    assert results["kv, weight 1"].spread <= 1.5
    assert results["least-loaded"].spread <= 1.5


@pytest.mark.parametrize("rate", [30.0, 60.0])
def test_hot_spot_family_does_not_pile_onto_one_worker(rate: float) -> None:
    """Issue 27: one conversation family (a shared 1,024-token prefix) is 50% of the traffic. The worker
    holding it must not take it all: once its prefill queue is longer than recomputing the prefix
    elsewhere, the family spreads. Workers here compute one prefill at a time (a real queue)."""
    runs = {"kv (ttft)": run_hot_spot("kv", rate=rate), "least-loaded": run_hot_spot("least-loaded", rate=rate),
            "kv, weight 2": run_hot_spot("kv", rate=rate, overlap_weight=KV_WEIGHT, **OVERLAP)}
    print(f"\nhot spot, {rate:g} requests/s, 50% one family: time-averaged prefill queue per worker; TTFT")
    for name, sim in runs.items():
        queue = [sim.waiting_area[w] / sim.now for w in sorted(sim.workers)]
        ttft = sorted(sim.ttfts)
        st = sim.stats
        print(f"  {name:>13}: queue {[round(q, 2) for q in queue]} (max/mean {max(queue) / statistics.mean(queue):.2f}), "
              f"hit rate {st.hit_rate / st.best_hit_rate:.3f} of best, requests {sorted(st.per_worker.values())}, "
              f"TTFT p50 {ttft[len(ttft) // 2]:.3f} s p99 {ttft[int(0.99 * len(ttft))]:.3f} s")
    sim = runs["kv (ttft)"]
    queue = [sim.waiting_area[w] / sim.now for w in sorted(sim.workers)]
    assert max(queue) <= 2 * statistics.mean(queue)
    assert max(sim.stats.per_worker.values()) < 0.5 * sum(sim.stats.per_worker.values())
    assert sim.stats.hit_rate >= 0.9 * sim.stats.best_hit_rate
