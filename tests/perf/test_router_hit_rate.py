"""Issue #7 acceptance: with mocker workers behind the real frontend, the kv router's multi-turn
prefix hit rate at 16 workers is reported and beats round-robin's (and stays near the oracle)."""

from __future__ import annotations

from kvrelay.perf.router_bench import best_possible_hit_rate, hit_rate, parser


def test_kv_router_beats_round_robin_at_16_mocker_workers():
    args = parser().parse_args([])  # 32 users x 6 turns, 200-token shared system prompt
    best = best_possible_hit_rate(args)
    kv = hit_rate(16, "kv", args)
    rr = hit_rate(16, "round-robin", args)
    print(f"\n16 mocker workers: best {best:.3f}; kv {kv['hit_rate']:.3f} ({kv['hit_rate'] / best:.2f} of best); "
          f"round-robin {rr['hit_rate']:.3f}")
    assert kv["failed"] == rr["failed"] == 0
    assert kv["hit_rate"] > 1.5 * rr["hit_rate"]
    assert kv["hit_rate"] >= 0.9 * best
