"""Soak (slow lane): 1,000 sequential disaggregated requests leak nothing — neither KV blocks on
either worker, nor leases, nor NIXL registrations, descriptor lists, peers or transfer handles."""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import replace

import pytest

from kvrelay.transfer import TransferStats
from kvrelay.workers.api.endpoints import Endpoint
from kvrelay.workers.api.messages import Empty
from kvrelay.workers.config import WorkerConfig
from tests.disagg.cluster import Cluster
from tests.disagg.test_disagg_identity import _transfer_kinds

pytestmark = pytest.mark.slow

REQUESTS = 1000


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", _transfer_kinds())
def test_1000_sequential_disaggregated_requests_leak_nothing(kind):
    rng = random.Random(11)
    cfg = WorkerConfig(model="tiny", kv_cache_bytes=32 << 20, kv_transfer=kind, kv_disk_bytes=256 << 20,
                       kv_host_bytes=64 << 20)

    async def snapshot(c: Cluster):
        out = []
        for w in c.workers:
            xfer = await c.service.rpc.unary(w.instance.address, Endpoint.TRANSFER_STATS, Empty(), TransferStats)
            s = w.engine.stats()
            out.append((s.free_blocks, s.total_blocks, s.held_requests, xfer.registered_regions,
                        xfer.prepped_dlists, xfer.peers, xfer.active_handles))
        return out

    async def run():
        async with Cluster(["prefill", "decode"], replace(cfg)) as c:
            await c.generate([5] * 40, max_tokens=2)  # connect the peers once
            await c.settle()
            before, fds = await snapshot(c), _open_fds()
            for i in range(REQUESTS):
                n = rng.randrange(17, 400)
                tokens = await c.generate([rng.randrange(3, 2000) for _ in range(n)], max_tokens=3)
                assert len(tokens) == 3, i
            await c.settle()
            decode = c.by_role("decode")[0].engine.stats()
            return before, await snapshot(c), fds, _open_fds(), decode

    before, after, fds_before, fds_after, decode = asyncio.run(run())
    assert after == before
    for free, total, held, *_ in after:
        assert free == total and held == 0
    assert all(s[-1] == 0 for s in after)  # no transfer handle left active
    assert decode.remote_prefills == REQUESTS + 1 and decode.pull_failures == 0
    assert fds_after <= fds_before + 2
