"""Issue 29, "say what happened": G3 checksum failures and a torn index were counters only. Now each
is a WARNING an operator sees: checksum failures rate-limited, a torn index with how many blocks came
back."""

from __future__ import annotations

import asyncio
import os

import torch

from kvrelay.kvbm.tiers import DiskStore

BLOCK = 4096


def _blocks(n: int) -> list[torch.Tensor]:
    return [torch.full((BLOCK,), i % 251, dtype=torch.uint8) for i in range(n)]


def test_torn_index_and_checksum_failures_are_logged(tmp_path, caplog):
    d = tmp_path / "g3"

    async def fill() -> None:
        store = DiskStore(d, BLOCK, 1 << 20, direct_io=False)
        assert all(await store.put(list(range(1, 11)), _blocks(10)))
        await store.close()

    async def reopen_and_read() -> DiskStore:
        store = DiskStore(d, BLOCK, 1 << 20, direct_io=False)
        got = await store.get(list(range(1, 11)), [torch.empty(BLOCK, dtype=torch.uint8) for _ in range(10)])
        await store.close()
        return got

    asyncio.run(fill())
    index = d / "index.log"
    size = index.stat().st_size
    with open(index, "r+b") as f:  # a crash mid-append: the 8th record torn, the rest lost
        f.truncate(size - 3 * 40 + 17)
    with open(d / "blocks.dat", "r+b") as f:  # and a bad sector under block 1 (slot 0)
        f.seek(100)
        f.write(b"\xff\x00\xff")
    with caplog.at_level("WARNING", logger="kvrelay.kvbm.tiers"):
        got = asyncio.run(reopen_and_read())
    assert sum(got) == 6 and not got[0], got  # 7 blocks recovered, one of them corrupt
    torn = [r.getMessage() for r in caplog.records if "torn at record" in r.getMessage()]
    assert len(torn) == 1 and "recovered 7 blocks" in torn[0], caplog.text
    assert "KV tier G3: 1 block(s) failed their checksum" in caplog.text
    assert os.stat(d / "index.log").st_size < size  # compacted to what was recovered
