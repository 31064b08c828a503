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


def test_a_codec_tier_prior_is_its_effective_bandwidth_decode_included():
    """I/O moves ratio x fewer bytes, then every byte is decoded: per raw byte 1/(io * ratio) + 1/decode."""
    m = model(prefill_tps=10_000)  # 1.6 ms per 2 MiB block: recompute costs ~1.3 GB/s of "bandwidth"
    io = m.tiers["G3"].bytes_per_s
    m.fold_codec("G3", ratio=4.0, decode_bytes_per_s=4 * io)
    assert abs(m.tiers["G3"].bytes_per_s - 2 * io) < 1e-6 * io  # 1/(4io) + 1/(4io) = 1/(2io)
    m.tiers["G3"].bytes_per_s, m.tiers["G3"].latency_s = 10e9, 0.0
    m.fold_codec("G4", ratio=2.0, decode_bytes_per_s=50e6)  # a decode slower than recompute
    m.tiers["G4"].latency_s = 0.0
    assert m.best_cut(["G4"] * 8) == 0  # the raw I/O alone (30 MB/s x 2) would have lost anyway
    m.tiers["G4"].bytes_per_s = 1.0 / (1.0 / 20e9 + 1.0 / 50e6)  # even a fast link: the decode decides
    assert m.best_cut(["G4"] * 8) == 0
    m.fold_codec("G2", ratio=1.2, decode_bytes_per_s=100e9)
    assert m.best_cut(["G2"] * 8) == 8


def test_a_measured_tier_keeps_its_measurement():
    m = model(prefill_tps=10_000)
    m.observe_load("G3", 64, 64 * BLOCK_BYTES / 3e9)  # measured: the get's time, decode included
    measured = m.tiers["G3"].bytes_per_s
    m.fold_codec("G3", ratio=1.2, decode_bytes_per_s=0.5e9)
    assert m.tiers["G3"].bytes_per_s == measured and m.codecs["G3"] == (1.2, 0.5e9)


async def test_opening_a_codec_tier_folds_its_measured_decode_into_the_prior(tmp_path):
    import torch

    from kvrelay.kvbm.cost_model import PRIORS
    from kvrelay.kvbm.tier_config import TierConfig
    from kvrelay.kvbm.tiered_kv import TieredKv
    from kvrelay.workers.api.messages import KvLayout

    layout = KvLayout(layout="block_contiguous", num_blocks=4, num_layers=2, block_size=16, num_kv_heads=2,
                      head_dim=64, dtype="float32", device="cpu")
    shape_bytes = 2 * 2 * 16 * 2 * 64 * 4
    rows = torch.zeros((4, shape_bytes), dtype=torch.uint8)
    cfg = TierConfig(host_bytes=0, disk_dir=str(tmp_path / "g3"), disk_bytes=16 << 20, compress_g3="lossless")
    kv = await TieredKv.open(cfg, rows, 16, "fp-test", layout=layout)
    try:
        ratio, decode = kv.cost.codecs["G3"]
        assert 1.0 < ratio < 2.0 and decode > 0  # float32 normals: the exponent plane shrinks
        io = PRIORS["G3"][1]
        want = 1.0 / (1.0 / (io * ratio) + 1.0 / decode)
        assert abs(kv.cost.tiers["G3"].bytes_per_s - want) < 1e-6 * want
    finally:
        for s in kv.stores:
            await s.close()
