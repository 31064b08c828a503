"""A request preempted for lack of G1 blocks, whose blocks were then evicted from G1 while it waited,
loads them back from a lower tier when it is re-admitted instead of recomputing them, with the same
greedy tokens as a run that was never preempted, and every block accounted for.

With write-through offload its blocks reached G2 when they were computed, so they are there to load.
With write-back they are copied only once released, and a preempted sequence's blocks are released
precisely to be reused at once: they rarely reach a tier, and the request is recomputed (the lookup
costs one loop hop). Both modes must give the same tokens and return every block."""

from __future__ import annotations

import asyncio

import pytest

from kvrelay.kvbm.tier_config import TierConfig
from tests.kvbm.tiered_helpers import engine, generate, prompt, settle


@pytest.mark.parametrize("offload", ["write-through", "write-back"])
def test_preempted_request_is_loaded_back_from_g2(offload):
    prompts = [prompt(100, seed=40 + i) for i in range(4)]

    async def run(eng):
        await eng.start()
        try:
            out = await asyncio.gather(*(generate(eng, p, n=120, rid=f"r{i}") for i, p in enumerate(prompts)))
            await settle(eng, timeout=30)
            return out, eng.stats()
        finally:
            await eng.close()

    want, _ = asyncio.run(run(engine(None, num_blocks=1024)))
    # 4 sequences growing to 14 blocks each on a G1 of 24: constant preemption and eviction.
    cfg = TierConfig(host_bytes=16 << 20, disk_dir="off", onboard="always", offload=offload)
    got, s = asyncio.run(run(engine(cfg, num_blocks=24)))
    print(f"\n{offload}: preemptions {s.preemptions}, onboarded {s.onboarded_blocks}, of which reloaded after "
          f"preemption {s.reonboarded_blocks}")
    assert got == want
    assert s.preemptions > 0
    if offload == "write-through":
        assert s.reonboarded_blocks > 0
    assert s.free_blocks == s.total_blocks and s.running == s.waiting == 0 and s.offload_pinned == 0
