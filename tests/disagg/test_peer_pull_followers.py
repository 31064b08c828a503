"""The cluster KV pool: a burst of requests sharing a prefix that a peer holds pulls it once per worker
(the first asks and pulls; the others follow it and hit what it pulled), and a follower whose leader's
pull fails still completes with the cold run's tokens. Real native engines on the tiny model, the real
transfer engine and lease path (tests/disagg/cluster.py)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from kvrelay.runtime.rpc import RpcClient
from kvrelay.workers.api.client import WorkerClient
from kvrelay.workers.api.messages import KvPeer
from tests.disagg.cluster import Cluster
from tests.disagg.test_disagg_identity import CFG
from tests.disagg.test_peer_pull import BS, _generate, _prompt

PREFIX = 640  # 40 full blocks shared by every request of the burst
N = 6


def _burst_prompts() -> list[list[int]]:
    prefix = _prompt(PREFIX, 11)
    return [prefix + _prompt(40, 100 + i) for i in range(N)]


def _slow_asks(worker, seconds: float) -> None:
    """The lender answers `seconds` late (a loaded peer, a long link): the burst's requests all arrive
    while the first one's ask is out, however fast this machine is, so what follows is deterministic."""
    loop = worker.engine.loops.get("peer")
    ask = loop.link.ask

    async def slow(*args):
        await asyncio.sleep(seconds)
        return await ask(*args)

    loop.link = replace(loop.link, ask=slow)


def test_a_burst_sharing_a_peers_prefix_pulls_it_once_and_every_request_hits_it():
    prompts = _burst_prompts()

    async def run():
        async with Cluster(["agg", "agg"], CFG) as c:
            a, b = c.workers
            client = WorkerClient(RpcClient(token=c.token))
            cold = [await _generate(client, a.instance.address, p) for p in prompts]  # A holds the prefix
            _slow_asks(b, 0.8)  # < the asker's 2 s bound
            peer = KvPeer(instance_id=a.instance_id, address=a.instance.address, blocks=PREFIX // BS)
            burst = await asyncio.gather(*(_generate(client, b.instance.address, p, peer) for p in prompts))
            await c.settle()
            await asyncio.sleep(0.2)  # release notifications reach the lender
            stats_a, stats_b = a.engine.stats(), b.engine.stats()
            await client.close()
            return cold, burst, stats_a, stats_b

    cold, burst, a, b = asyncio.run(run())
    assert [t for t, _ in burst] == [t for t, _ in cold]  # token for token
    assert all(cached >= PREFIX for _, cached in burst)  # every request of the burst hit the prefix
    assert b.peer_pulled_blocks == PREFIX // BS  # pulled once, not once per request
    # One asked; the others waited for its pull (one arriving after it landed hits G1 without asking)
    assert b.peer_asked == 1 and 1 <= b.peer_followed <= N - 1
    assert b.peer_budget_refusals == 0 and b.prefill_tokens_computed < PREFIX + N * 48
    assert a.peer_lease_pinned == 0
    for s in (a, b):
        assert s.free_blocks == s.total_blocks


def test_followers_of_a_pull_from_a_gone_peer_compute_and_complete():
    prompts = _burst_prompts()

    async def run():
        async with Cluster(["agg", "agg", "agg"], CFG) as c:
            a, b, ref = c.workers
            client = WorkerClient(RpcClient(token=c.token))
            cold = [await _generate(client, ref.instance.address, p) for p in prompts]
            await a.close()  # the named holder is gone: the leader's ask fails, its followers wake
            c.workers.remove(a)
            peer = KvPeer(instance_id=a.instance_id, address=a.instance.address, blocks=PREFIX // BS)
            burst = await asyncio.wait_for(
                asyncio.gather(*(_generate(client, b.instance.address, p, peer) for p in prompts)), 60)
            await c.settle()
            stats_b = b.engine.stats()
            await client.close()
            return cold, burst, stats_b

    cold, burst, b = asyncio.run(run())
    assert [t for t, _ in burst] == [t for t, _ in cold]
    assert b.peer_pulled_blocks == 0 and b.peer_fallbacks >= 1
    assert b.free_blocks == b.total_blocks
