"""A NIXL transfer between GPU memory (VRAM) and host memory (DRAM) through the real `nixl` package and
kvrelay's transfer engine: what a decode worker on a GPU does when it pulls a prefill worker's blocks
(here both agents in one process, UCX over loopback)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BLOCKS, BLOCK_BYTES = 32, 64 * 1024


@pytest.mark.parametrize("direction", ["vram_to_dram", "dram_to_vram"])
async def test_nixl_moves_blocks_between_vram_and_dram(direction):
    pytest.importorskip("nixl")
    from kvrelay.transfer.nixl_engine import NixlTransferEngine

    gpu = torch.randint(0, 256, (BLOCKS, BLOCK_BYTES), dtype=torch.uint8, device="cuda")
    cpu = torch.randint(0, 256, (BLOCKS, BLOCK_BYTES), dtype=torch.uint8)
    src, dst = (gpu, cpu) if direction == "vram_to_dram" else (cpu, gpu)
    holder, reader = NixlTransferEngine("holder"), NixlTransferEngine("reader")
    holder.register_pool("kv", src, BLOCK_BYTES)
    reader.register_pool("kv", dst, BLOCK_BYTES)
    try:
        await holder.start()
        await reader.start()
        reader.add_peer("holder", holder.metadata())
        remote, local = [3, 4, 5, 9, 20], [0, 1, 2, 30, 31]
        await reader.read("holder", "kv", remote, "kv", local)
        torch.cuda.synchronize()
        for r, lo in zip(remote, local, strict=True):
            assert torch.equal(dst[lo].cpu(), src[r].cpu())
    finally:
        await reader.close()
        await holder.close()
