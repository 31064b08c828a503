"""Acceptance: a prompt whose KV was evicted from G1 into G2, G3 or G4 is served from that tier with the
same greedy tokens as a cold run, and the stats show the onboard."""

from __future__ import annotations

import asyncio

import pytest

from kvrelay.kvbm.tier_config import TierConfig
from tests.kvbm.tiered_helpers import block_hashes, engine, flush_g1, generate, prompt, settle, tier

# G4 on loopback moto loads ~1 ms per 32 KiB block; the tiny model recomputes a block in less, so the
# cost model (rightly) recomputes; "always" makes the G4 path run. test_cost_model covers the choice.
ONLY = {
    "G2": lambda tmp, s3: TierConfig(host_bytes=8 << 20, disk_dir="off"),
    "G3": lambda tmp, s3: TierConfig(host_bytes=0, disk_dir=str(tmp / "g3"), disk_bytes=16 << 20),
    "G4": lambda tmp, s3: TierConfig(host_bytes=0, disk_dir="off", object_store=s3.store_url(s3.new_bucket()),
                                     object_bytes=16 << 20, onboard="always"),
}


@pytest.mark.parametrize("name", ["G2", "G3", "G4"])
def test_evicted_prompt_is_onboarded_with_identical_tokens(name, tmp_path, s3):
    p = prompt(300, seed=7)  # 18 full blocks; G1 holds 48

    async def main():
        cold_eng = engine(None)
        await cold_eng.start()
        cold, _ = await generate(cold_eng, p)
        await cold_eng.close()

        eng = engine(ONLY[name](tmp_path, s3))
        await eng.start()
        try:
            assert [t.tier for t in eng.stats().tiers] == [name]
            first, hit = await generate(eng, p)
            assert first == cold and hit == 0
            await settle(eng)
            await flush_g1(eng)
            hashes = block_hashes(eng, p)
            snap = eng.core.kv_snapshot()
            assert not set(hashes) & set(snap.tiers["G1"])  # evicted from G1 ...
            assert set(hashes[:18]) <= set(snap.tiers[name])  # ... and held by the tier
            before = eng.stats()
            again, hit = await generate(eng, p)
            after = eng.stats()
            assert again == cold
            assert hit == 18 * 16  # every full prompt block but none covering the last token
            assert after.onboarded_blocks - before.onboarded_blocks == 18
            t = tier(eng, name)
            assert t.onboard_blocks >= 18 and t.onboard_bytes >= 18 * eng.kv_layout().block_bytes
            assert t.hits >= 18
        finally:
            await eng.close()

    asyncio.run(main())
