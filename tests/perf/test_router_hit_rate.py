"""Issue #7 acceptance: with mocker workers behind the real frontend, the kv router's multi-turn
prefix hit rate at 16 workers is reported and beats round-robin's (and stays near the oracle).

One run's kv hit rate varies with timing (which worker's load report is how stale when a turn is
routed): 16 runs here gave 0.70-0.77, mean 0.74 (0.93 of best), so the bar is held by the median of
three runs, not by one draw."""

from __future__ import annotations

import statistics

from kvrelay.perf.router_bench import best_possible_hit_rate, hit_rate, parse_args


def test_kv_router_beats_round_robin_at_16_mocker_workers():
    args = parse_args([])  # 32 users x 6 turns, 200-token shared system prompt
    best = best_possible_hit_rate(args)
    kv_runs = [hit_rate(16, "kv", args) for _ in range(3)]
    rr = hit_rate(16, "round-robin", args)
    kv = statistics.median(r["hit_rate"] for r in kv_runs)
    runs = ", ".join(f"{r['hit_rate']:.3f}" for r in kv_runs)
    print(f"\n16 mocker workers: best {best:.3f}; kv median {kv:.3f} ({kv / best:.2f} of best; runs {runs}); "
          f"round-robin {rr['hit_rate']:.3f}")
    assert all(r["failed"] == 0 for r in kv_runs) and rr["failed"] == 0
    assert kv > 1.5 * rr["hit_rate"]
    assert kv >= 0.9 * best
