"""Offload and onboarding racing with allocation: many concurrent requests over shared prefixes on a G1
that holds a fraction of them, so blocks are evicted, offloaded and onboarded all the time. Every
request's greedy tokens must equal a run without tiers, and every block must come back."""

from __future__ import annotations

import asyncio
import random

import pytest

from kvrelay.kvbm.tier_config import TierConfig
from tests.kvbm.tiered_helpers import engine, generate, settle

PREFIXES = [[random.Random(s).randrange(4, 2000) for _ in range(160)] for s in range(6)]


def _requests(n: int) -> list[list[int]]:
    rng = random.Random(99)
    return [rng.choice(PREFIXES) + [rng.randrange(4, 2000) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


@pytest.mark.parametrize("offload", ["write-back", "write-through"])
def test_concurrent_requests_with_constant_eviction_keep_tokens_and_blocks(tmp_path, offload):
    prompts = _requests(48)

    async def run(eng, concurrency: int) -> list[list[int]]:
        await eng.start()
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int, p: list[int]) -> list[int]:
            async with sem:
                return (await generate(eng, p, n=8, rid=f"r{i}"))[0]

        try:
            out = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            await settle(eng, timeout=30)
            s = eng.stats()
            assert s.free_blocks == s.total_blocks and s.running == s.waiting == 0
            return out, s
        finally:
            await eng.close()

    want, _ = asyncio.run(run(engine(None, num_blocks=1024), 1))
    cfg = TierConfig(host_bytes=8 << 20, disk_dir=str(tmp_path / "g3"), disk_bytes=32 << 20, offload=offload)
    got, stats = asyncio.run(run(engine(cfg, num_blocks=48), 8))  # ~2 prompts' worth of G1
    assert got == want
    print(f"{offload}: onboarded {stats.onboarded_blocks} blocks, preemptions {stats.preemptions}")
    assert stats.onboarded_blocks > 0
