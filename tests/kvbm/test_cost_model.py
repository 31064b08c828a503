"""The onboard-or-recompute decision (kvbm/cost_model.py): logic on measured rates."""

from __future__ import annotations

from kvrelay.kvbm.cost_model import CostModel

BLOCK_BYTES, BLOCK = 2 << 20, 16  # a Llama-8B-sized block


def model(prefill_tps: float) -> CostModel:
    m = CostModel(BLOCK_BYTES, BLOCK)
    m.observe_prefill(4096, 4096 / prefill_tps)
    return m


def test_fast_tier_is_loaded_and_slow_tier_recomputed():
    m = model(prefill_tps=10_000)  # 1.6 ms per block
    m.observe_load("G2", 64, 64 * BLOCK_BYTES / 10e9)  # 10 GB/s: 0.2 ms per block
    m.observe_load("G4", 64, 64 * BLOCK_BYTES / 100e6)  # 100 MB/s: 21 ms per block
    assert m.best_cut(["G2"] * 10) == 10
    assert m.best_cut(["G4"] * 10) == 0
    # a G2 head and a G4 tail: load the head, recompute the tail
    assert m.best_cut(["G2"] * 6 + ["G4"] * 4) == 6
    # G1 hits (None) are free: they extend the prefix whatever follows
    assert m.best_cut([None, None, "G2", "G2"]) == 4


def test_latency_is_paid_once_per_tier():
    m = model(prefill_tps=10_000)
    m.tiers["G3"].latency_s, m.tiers["G3"].bytes_per_s = 5e-3, 20e9  # 5 ms round trip, fast stream
    assert m.best_cut(["G3"]) == 0  # one block (1.6 ms of compute) does not pay the round trip
    assert m.best_cut(["G3"] * 8) == 8  # eight do (12.8 ms vs ~5.8 ms)


def test_measurements_move_the_decision():
    m = model(prefill_tps=10_000)
    for _ in range(20):  # the tier turns out slower than its prior
        m.observe_load("G2", 32, 32 * BLOCK_BYTES / 50e6)
    assert m.best_cut(["G2"] * 10) == 0
    for _ in range(20):  # the engine turns out slower still (a big model): loading pays again
        m.observe_prefill(4096, 4096 / 200.0)
    assert m.best_cut(["G2"] * 10) == 10


def test_always_loads_everything():
    m = CostModel(BLOCK_BYTES, BLOCK, always=True)
    assert m.best_cut(["G4"] * 5) == 5
