"""Acceptance (issue 32): the lossless codec gives back exactly the bytes of every block of a 200-prompt
run. The tiny model serves 200 prompts (2-4 full blocks each) with G3 = lossless, write-through (every
block goes down as soon as it is computed); each prompt's blocks are then read back through G3 (encoded
on the way down, a variable-size frame in the sparse file, checksummed, decoded) and compared byte for
byte with the rows G1 still holds. Random bytes of every dtype are covered by test_codecs' hypothesis
test; this is the real KV of a real run, through the tier."""

from __future__ import annotations

import asyncio
import random

import torch

from kvrelay.kvbm.tier_config import TierConfig
from tests.kvbm.tiered_helpers import BLOCK, block_hashes, engine, generate, settle


def test_every_block_of_a_200_prompt_run_decodes_to_its_exact_bytes(tmp_path):
    rng = random.Random(32)
    prompts = [[rng.randrange(4, 2000) for _ in range(rng.randrange(2 * BLOCK, 5 * BLOCK))] for _ in range(200)]

    async def main():
        cfg = TierConfig(host_bytes=0, disk_dir=str(tmp_path / "g3"), disk_bytes=256 << 20,
                         compress_g3="lossless", offload="write-through")
        eng = engine(cfg, num_blocks=64)
        await eng.start()
        compared, stored_bytes = 0, 0
        try:
            store = eng.loops.get("tiers").tiers.stores[0]
            assert type(store).__name__ == "CodecStore" and store.inner.variable
            for p in prompts:
                await generate(eng, p, n=1)
                await settle(eng)
                hashes = block_hashes(eng, p)
                ids = [eng.core.pool.cached[h].block_id for h in hashes]  # still in G1 (64 blocks, <= 5 used)
                want = eng.core.kv_rows()[ids].clone()
                got = torch.zeros_like(want)
                assert await store.get(hashes, list(got)) == [True] * len(hashes)
                assert torch.equal(got, want)
                compared += len(hashes)
            stored_bytes = store.stats.used_bytes
            raw = store.stats.blocks * store.block_bytes
        finally:
            await eng.close()
        assert compared >= 400
        assert stored_bytes < raw  # and it was compressed: charged by the frames' bytes

    asyncio.run(main())
