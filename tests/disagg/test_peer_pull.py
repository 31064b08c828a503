"""The cluster KV pool (issue 31): a worker pulls a prompt prefix another worker holds in G1 instead of
computing it, and the greedy tokens equal a cold run's, over NIXL and over TCP.

Real parts: native engines on the tiny model, real transfer engines, the request plane over loopback,
the frontend's router (its index from the workers' KV events) and the peer lease/pull path.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import replace

import pytest

from kvrelay.kvbm.hashing import block_hashes, root_hash
from kvrelay.runtime.rpc import RpcClient
from kvrelay.workers.api.client import WorkerClient
from kvrelay.workers.api.messages import EngineRequest, KvPeer, PeerLeaseRequest, SamplingParams
from tests.disagg.cluster import Cluster
from tests.disagg.test_disagg_identity import CFG, _transfer_kinds

BS = 16


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2000) for _ in range(n)]


async def _generate(client: WorkerClient, address: str, prompt: list[int], peer: KvPeer | None = None,
                    salt: str = "") -> tuple[list[int], int]:
    req = EngineRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt, cache_salt=salt, kv_peer=peer,
                        sampling=SamplingParams(max_tokens=10, ignore_eos=True))
    tokens, cached = [], 0
    async with client.generate(address, req) as stream:
        async for out in stream:
            tokens += out.token_ids
            cached = max(cached, out.num_cached_tokens)
    return tokens, cached


@pytest.mark.parametrize("kind", _transfer_kinds())
def test_a_worker_pulls_a_prefix_its_peer_holds_and_decodes_the_same_tokens(kind):
    prompt = _prompt(700, 1)  # 43 full blocks; the last token's block is computed

    async def run():
        async with Cluster(["agg", "agg"], replace(CFG, kv_transfer=kind)) as c:
            a, b = c.workers
            client = WorkerClient(RpcClient(token=c.token))
            cold, cold_cached = await _generate(client, a.instance.address, prompt)
            peer = KvPeer(instance_id=a.instance_id, address=a.instance.address, blocks=len(prompt) // BS)
            pulled, cached = await _generate(client, b.instance.address, prompt, peer)
            other_salt, salt_cached = await _generate(client, b.instance.address, _prompt(300, 2), peer, salt="t2")
            await c.settle()
            await asyncio.sleep(0.2)  # the pull's release notification reaches the lender
            stats_a, stats_b = a.engine.stats(), b.engine.stats()
            await client.close()
            return cold, cold_cached, pulled, cached, salt_cached, stats_a, stats_b

    cold, cold_cached, pulled, cached, salt_cached, a, b = asyncio.run(run())
    assert cold_cached == 0 and pulled == cold  # token for token, as computed cold on the holder
    full = (700 - 1) // BS  # blocks that may load: never the last token's
    assert cached == full * BS  # the pulled prefix counts as cached
    assert b.peer_asked == 2 and b.peer_pulled_blocks == full and b.peer_pull_failures == 0
    assert a.peer_lent_blocks == full and a.peer_lease_pinned == 0  # the lease was given back
    assert salt_cached == 0 and b.peer_fallbacks == 1  # another salt's hashes: the peer lends nothing
    for s in (a, b):  # no block left referenced: every lease and every request freed its blocks
        assert s.free_blocks == s.total_blocks


def test_the_router_sends_a_busy_holders_conversation_elsewhere_with_a_pull_plan():
    """The holder is unavailable for new work (suspended, as a busy or draining worker is): the frontend
    routes to the other worker and tells it to pull; tokens equal the cold run's, the prefix is cached."""
    prompt = _prompt(500, 3)

    async def run():
        async with Cluster(["agg", "agg"], CFG) as c:
            first = await c.generate(prompt, max_tokens=8)
            await asyncio.sleep(0.3)  # KV events reach the router's index
            holder = next(w for w in c.workers if w.engine.stats().prefix_hit_tokens == 0
                          and w.engine.stats().prompt_tokens > 0)
            c.service.pool.suspend(holder.instance_id, 30.0)
            second = await c.generate(prompt, max_tokens=8)
            await c.settle()
            other = next(w for w in c.workers if w is not holder)
            routes = c.service.peer_routes.labels(choice="pull")._value.get()
            return first, second, other.engine.stats(), routes

    first, second, other, routes = asyncio.run(run())
    assert second == first
    assert routes == 1 and other.peer_pulled_blocks == (500 - 1) // BS and other.prefix_hit_tokens == other.peer_pulled_blocks * BS


def test_a_gone_or_forgetful_peer_costs_a_recompute_not_the_request():
    """Faults: the named peer holds nothing (evicted, or never had it) or is gone (its worker closed):
    the request completes with the cold run's tokens, nothing is cached, nothing stays pinned."""
    prompt = _prompt(400, 5)

    async def run():
        async with Cluster(["agg", "agg", "agg"], CFG) as c:
            a, b, fresh = c.workers
            client = WorkerClient(RpcClient(token=c.token))
            cold, _ = await _generate(client, a.instance.address, prompt)
            forgetful = KvPeer(instance_id=fresh.instance_id, address=fresh.instance.address, blocks=25)
            got_forgetful, cached_forgetful = await _generate(client, b.instance.address, prompt, forgetful)
            await a.close()  # the holder is gone: its address refuses connections
            c.workers.remove(a)
            gone = KvPeer(instance_id=a.instance_id, address=a.instance.address, blocks=25)
            got_gone, cached_gone = await _generate(client, fresh.instance.address, prompt, gone)
            await c.settle()
            await client.close()
            return cold, got_forgetful, cached_forgetful, got_gone, cached_gone, b.engine.stats(), fresh.engine.stats()

    cold, got_forgetful, cached_forgetful, got_gone, cached_gone, b, fresh = asyncio.run(run())
    assert got_forgetful == cold and got_gone == cold
    assert cached_forgetful == 0 and b.peer_fallbacks == 1 and b.peer_pulled_blocks == 0
    assert fresh.peer_fallbacks == 1 and fresh.peer_lease_pinned == 0
    # `fresh` computed the prompt once (for the gone peer's request): its own G1 held nothing before
    assert cached_gone == 0


def test_mocker_workers_pull_from_each_other_over_the_simulated_link():
    prompt = _prompt(640, 6)

    async def run():
        async with Cluster(["agg", "agg"], replace(CFG, engine="mocker", mocker_speedup=0.0)) as c:
            a, b = c.workers
            client = WorkerClient(RpcClient(token=c.token))
            await _generate(client, a.instance.address, prompt)
            peer = KvPeer(instance_id=a.instance_id, address=a.instance.address, blocks=40)
            _, cached = await _generate(client, b.instance.address, prompt, peer)
            await c.settle()
            await asyncio.sleep(0.2)  # the simulated pull's `release` call reaches the lender
            await client.close()
            return cached, a.engine.stats(), b.engine.stats()

    cached, a, b = asyncio.run(run())
    assert cached == 39 * BS and b.peer_pulled_blocks == 39 and a.peer_lent_blocks == 39 and a.peer_lease_pinned == 0


def test_a_peer_without_the_internal_token_cannot_lease_a_prefix():
    """The trust boundary: `kv_lease` is an internal call; a caller without the cluster's token is refused
    before the engine is asked, so nothing is pinned or lent (the transfer port refuses it too:
    tests/runtime/test_internal_token.py)."""
    prompt = _prompt(400, 9)

    async def run():
        async with Cluster(["agg"], CFG, token="the-cluster-token") as c:
            (a,) = c.workers
            client = WorkerClient(RpcClient(token=c.token))
            await _generate(client, a.instance.address, prompt)
            hashes = block_hashes(prompt, BS, root_hash(a.engine.fingerprint, ""))
            outsider = WorkerClient(RpcClient(token="not-the-cluster-token"))
            refused = None
            try:
                await outsider.lease(a.instance.address, PeerLeaseRequest(
                    lease_id="peer:outsider", fingerprint=a.engine.fingerprint, block_hashes=hashes))
            except Exception as e:  # the request plane's refusal
                refused = e
            granted = await client.lease(a.instance.address, PeerLeaseRequest(  # the same call, with the token
                lease_id="peer:insider", fingerprint=a.engine.fingerprint, block_hashes=hashes))
            stats = a.engine.stats()
            await outsider.close()
            await client.close()
            return refused, granted, stats

    refused, granted, stats = asyncio.run(run())
    assert refused is not None and "token" in str(refused).lower(), refused
    assert granted.handle is not None and len(granted.handle.block_ids) == 400 // BS  # it is the token alone
    assert stats.peer_lent_blocks == 400 // BS  # only the insider's lease pinned anything
