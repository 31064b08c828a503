"""The cluster KV pool on the real default model (SmolLM2-135M-Instruct): a prompt prefilled on worker A,
forced to worker B with A named as its peer, is pulled (verified against A's checksums) instead of
computed, counts as cached, and B's greedy tokens equal A's cold run.

`slow`: two workers load the model (about 22 s on a 2-core machine, most of it loading); the slow lane runs it."""

from __future__ import annotations

import asyncio

import pytest

from kvrelay.frontend.tokenizer import Tokenizer
from kvrelay.runtime.rpc import RpcClient
from kvrelay.workers.api.client import WorkerClient
from kvrelay.workers.api.messages import KvPeer
from kvrelay.workers.config import WorkerConfig
from tests.disagg.cluster import Cluster
from tests.disagg.test_peer_pull import _generate
from tests.models.smollm2 import model_dir, raw_prompt


@pytest.mark.slow
def test_a_prefix_pulled_from_a_peer_equals_cold_on_smollm2():
    prompt = raw_prompt(Tokenizer(model_dir()), 200, seed=7)
    full = (len(prompt) - 1) // 16
    cfg = WorkerConfig(model=str(model_dir()), kv_transfer="tcp", kv_cache_bytes=32 << 20, kv_host_bytes=0,
                       kv_disk_dir="off")

    async def run():
        async with Cluster(["agg", "agg"], cfg) as c:
            a, b = c.workers
            client = WorkerClient(RpcClient(token=c.token))
            cold, cold_cached = await _generate(client, a.instance.address, prompt)
            peer = KvPeer(instance_id=a.instance_id, address=a.instance.address, blocks=full)
            pulled, cached = await _generate(client, b.instance.address, prompt, peer)
            await c.settle()
            await client.close()
            return cold, cold_cached, pulled, cached, b.engine.stats()

    cold, cold_cached, pulled, cached, b = asyncio.run(run())
    assert cold_cached == 0 and pulled == cold
    assert cached == full * 16
    assert b.peer_pulled_blocks == full and b.peer_verify_failures == 0 and b.peer_pull_failures == 0
