"""The cluster KV pool on vLLM workers (issue 31, vLLM lane): a prompt prefilled on worker A and then
given to worker B with A named as its peer (`EngineRequest.kv_peer`, what the kv router sets when it
sends a request away from the holder) is served by B from blocks pulled from A over the transfer
engine (NIXL), not recomputed: B's cached_tokens cover the prefix, both workers' `kvrelay_kv_peer_*`
and transfer stats show the blocks, and B's greedy tokens equal A's cold run token for token. A request with another
cache_salt pulls nothing.

Real parts: `kvrelay serve --engine vllm` with two vLLM workers on SmolLM2-135M (float32, block size
32), kvrelay's tier connector in each, the request plane with the run's internal token. The requests
go to the workers' `generate` directly, as the frontend's router would send them.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import httpx

from kvrelay.runtime.discovery import DiscoveryConfig, list_instances, make_discovery
from kvrelay.runtime.rpc import RpcClient
from kvrelay.workers.api.client import WorkerClient
from kvrelay.workers.api.messages import EngineRequest, EngineStats, KvPeer, SamplingParams
from tests.e2e.serve import worker_stats
from tests.e2e.test_serve_disagg import _wait_all_workers
from tests.vllm.conftest import START_S, vllm_serve

BS = 32
BLOCK_BYTES = BS * 30 * 2 * 3 * 64 * 4  # SmolLM2-135M in float32: tokens * layers * (K, V) * kv heads * head dim * 4 B
PROMPT = [random.Random(31).randrange(3, 49000) for _ in range(840)]
FULL = (len(PROMPT) - 1) // BS  # 26 blocks may load: never the last token's


async def _instances(srv):
    disc = make_discovery(DiscoveryConfig(discovery="file", discovery_dir=srv.discovery_dir))
    await disc.start()
    try:
        return sorted(await list_instances(disc, "default"), key=lambda i: i.instance_id)
    finally:
        await disc.close()


async def _generate(client: WorkerClient, address: str, prompt: list[int], peer: KvPeer | None = None,
                    salt: str = "") -> tuple[list[int], int]:
    req = EngineRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt, cache_salt=salt, kv_peer=peer,
                        sampling=SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    tokens, cached = [], 0
    async with client.generate(address, req) as stream:
        async for out in stream:
            tokens += out.token_ids
            cached = max(cached, out.num_cached_tokens)
    return tokens, cached


def _expected_transport() -> str:
    try:
        from kvrelay.transfer import load_nixl_api

        load_nixl_api()
        return "nixl"
    except ImportError:
        return "tcp"


def _metric(metrics_addr: str, name: str) -> float:
    """A worker's own /metrics (its discovery label `metrics`)."""
    for line in httpx.get(f"http://{metrics_addr}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_a_vllm_worker_pulls_the_prefix_its_peer_holds_and_decodes_the_same_tokens(tmp_path):
    srv = vllm_serve(tmp_path, workers=2)
    try:
        _wait_all_workers(srv, 2, timeout=START_S)  # serve is up with one; the other may start minutes later

        async def run():
            a, b = await _instances(srv)
            client = WorkerClient(RpcClient(token=srv.internal_token))
            try:
                cold, cold_cached = await _generate(client, a.address, PROMPT)
                await asyncio.sleep(1.0)  # A's write-through saves reach its G2
                peer = KvPeer(instance_id=a.instance_id, address=a.address, blocks=len(PROMPT) // BS)
                pulled, cached = await _generate(client, b.address, PROMPT, peer)
                salted, salt_cached = await _generate(client, b.address, PROMPT, peer, salt="t2")
                await asyncio.sleep(1.0)  # the pool's counters ride vLLM's next stats
                await _generate(client, a.address, PROMPT[:40])  # a step on each: fresh connector stats
                await _generate(client, b.address, PROMPT[:40])
                moved = await client.transfer_stats(a.address), await client.transfer_stats(b.address)
            finally:
                await client.close()
            return a, b, cold, cold_cached, pulled, cached, salted, salt_cached, moved

        a, b, cold, cold_cached, pulled, cached, salted, salt_cached, (ta, tb) = asyncio.run(run())
        stats: dict[str, EngineStats] = {k: s for k, (_, s) in
                                         asyncio.run(worker_stats(DiscoveryConfig(discovery="file", discovery_dir=srv.discovery_dir),
                                                                   token=srv.internal_token)).items()}
        sa, sb = stats[a.instance_id], stats[b.instance_id]
        assert cold_cached == 0 and len(cold) == 16
        assert pulled == cold  # token for token, as computed cold on the holder
        assert cached == FULL * BS  # the pulled prefix counts as cached
        assert sb.peer_asked == 2 and sb.peer_pulled_blocks == FULL and sb.peer_pull_failures == 0
        assert sa.peer_lent_blocks == FULL and sa.peer_lease_pinned == 0  # the lease was given back
        assert salt_cached == 0 and sb.peer_fallbacks == 1  # another salt's hashes: A lends nothing
        assert salted == cold  # the same prompt computed under another salt: the same tokens
        assert _metric(b.labels["metrics"], "kvrelay_kv_peer_pulled_blocks_total") == FULL  # what /metrics exports
        assert _metric(a.labels["metrics"], "kvrelay_kv_peer_lent_blocks_total") == FULL
        # The bytes moved once, over the pool's transfer engine (NIXL where it loads, as here), A -> B.
        assert tb.kind == ta.kind == _expected_transport()
        assert tb.reads == 1 and tb.bytes_read == FULL * BLOCK_BYTES and tb.failures == 0
        assert ta.bytes_read == 0 and ta.notifications_received == 1  # the pull's release
    finally:
        srv.stop()
