"""The cluster KV pool beyond G1 (issue 31): a holder lends what only its G2 holds; pulled blocks are
verified against the lender's checksums (a corrupted block is recomputed, never served); a request
cancelled while its ask is out gives the lease back at once; a pull from a holder that stops serving
times out and recomputes; the pull budget computes what it cannot pull. Every request's greedy tokens
equal a cold run's, and no block stays pinned on either side.

Real parts: native engines on the tiny model, the TCP transfer engine, the request plane over loopback.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from prometheus_client import generate_latest

from kvrelay.runtime.rpc import RpcClient
from kvrelay.transfer.tcp_server import BlockServer
from kvrelay.workers.api.client import WorkerClient
from kvrelay.workers.api.messages import KvPeer, PeerLeaseRequest
from kvrelay.workers.metrics import MetricsServer
from kvrelay.workers.worker import Worker
from tests.disagg.cluster import Cluster
from tests.disagg.test_disagg_identity import CFG
from tests.disagg.test_peer_pull import BS, _generate, _prompt
from tests.kvbm.tiered_helpers import block_hashes, flush_g1, settle

TCP = replace(CFG, kv_transfer="tcp", kv_disk_dir="off")


def _peer(w: Worker, blocks: int) -> KvPeer:
    assert w.instance is not None
    return KvPeer(instance_id=w.instance_id, address=w.instance.address, blocks=blocks)


async def _no_pins(*workers: Worker, timeout: float = 5.0) -> None:
    """Every lease given back and every block free again, well within a lease's 30 s."""
    end = time.monotonic() + timeout
    while True:
        stats = [w.engine.stats() for w in workers]
        if all(s.peer_lease_pinned == 0 and s.free_blocks == s.total_blocks and s.running == s.waiting == 0
               for s in stats):
            return
        assert time.monotonic() < end, stats
        await asyncio.sleep(0.05)


def test_a_holder_lends_a_prefix_that_only_its_g2_holds():
    prompt = _prompt(500, 11)
    full = (500 - 1) // BS

    async def run():
        # A: G1 of 80 blocks and a G2; flushing G1 leaves the prompt's blocks only in G2
        async with Cluster(["agg"], TCP) as c:
            b = c.workers[0]
            a = await c.add_worker("agg", kv_cache_bytes=80 * 32768, kv_host_bytes=32 << 20)
            client = WorkerClient(RpcClient(token=c.token))
            cold, _ = await _generate(client, a.instance.address, prompt)
            await settle(a.engine, timeout=30)
            await flush_g1(a.engine)
            in_g1 = [h in a.engine.core.kv.cached for h in block_hashes(a.engine, prompt)[:full]]
            pulled, cached = await _generate(client, b.instance.address, prompt, _peer(a, full))
            await c.settle()
            await asyncio.sleep(0.2)  # the pull's release notification reaches the lender
            await settle(a.engine)
            await _no_pins(a, b)
            await client.close()
            scrape = generate_latest(MetricsServer(b.engine, "b").registry).decode()
            return cold, in_g1, pulled, cached, a.engine.stats(), b.engine.stats(), scrape

    cold, in_g1, pulled, cached, a, b, scrape = asyncio.run(run())
    assert not any(in_g1)  # the prefix was only in A's G2 when B asked
    assert pulled == cold and cached == full * BS
    assert a.peer_lent_from_g2 == full and a.peer_lent_blocks == full
    assert b.peer_pulled_blocks == full and b.peer_pulled_bytes == full * 32768 and b.peer_verify_failures == 0
    assert sum(b.peer_pull_seconds_buckets) == 1
    assert 'kvrelay_kv_peer_pull_seconds_bucket{le="+Inf",worker="b"} 1.0' in scrape
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines()
               if line.startswith("kvrelay_kv_peer_")}
    assert samples['kvrelay_kv_peer_pulled_bytes_total{worker="b"}'] == full * 32768


def test_a_corrupted_block_is_recomputed_never_served(monkeypatch):
    """The lender's block 7 is corrupted after it summed it (a bit flip in memory or on the way): the
    puller's checksum differs, blocks 7.. are computed, the tokens are the cold run's."""
    prompt = _prompt(400, 12)
    full, bad = (400 - 1) // BS, 7

    async def run():
        async with Cluster(["agg", "agg"], TCP) as c:
            a, b = c.workers
            sums = a.engine.block_checksums

            async def sum_then_corrupt(block_ids: list[int]) -> list[int]:
                out = await sums(block_ids)
                if len(block_ids) == full:  # the lease's sums: then the bytes go bad
                    a.engine.core.kv_rows()[block_ids[bad]] ^= 0x5A
                return out

            monkeypatch.setattr(a.engine, "block_checksums", sum_then_corrupt)
            client = WorkerClient(RpcClient(token=c.token))
            cold, _ = await _generate(client, a.instance.address, prompt)
            pulled, cached = await _generate(client, b.instance.address, prompt, _peer(a, full))
            await c.settle()
            await _no_pins(a, b)
            await client.close()
            return cold, pulled, cached, b.engine.stats()

    cold, pulled, cached, b = asyncio.run(run())
    assert pulled == cold
    assert b.peer_verify_failures == 1 and cached == bad * BS  # blocks before the bad one were kept
    assert b.peer_pulled_blocks == bad and b.peer_pull_failures == 1


def test_a_cancelled_request_gives_back_the_lease_its_ask_waits_for(monkeypatch):
    """B's request is cancelled while A is still pinning its lease: A's blocks are free again within a
    second or two, not when the lease would expire (30 s)."""
    prompt = _prompt(400, 13)
    full = (400 - 1) // BS

    async def run():
        async with Cluster(["agg", "agg"], TCP) as c:
            a, b = c.workers
            lease_blocks = a.engine.lease_blocks

            async def slow_lease(lease_id: str, hashes: list[int]) -> list[int]:
                await asyncio.sleep(0.6)
                return await lease_blocks(lease_id, hashes)

            monkeypatch.setattr(a.engine, "lease_blocks", slow_lease)
            client = WorkerClient(RpcClient(token=c.token))
            await _generate(client, a.instance.address, prompt)
            task = asyncio.create_task(_generate(client, b.instance.address, prompt, _peer(a, full)))
            await asyncio.sleep(0.3)  # B's ask is out, A has not pinned yet
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            t0 = time.monotonic()
            await asyncio.sleep(0.5)  # A pins now, for nobody
            await _no_pins(a, b, timeout=3.0)
            freed_after = time.monotonic() - t0
            await client.close()
            return a.engine.stats(), freed_after

    a, freed_after = asyncio.run(run())
    assert a.peer_lent_blocks == full  # A did pin the blocks, and gave them back at once
    assert freed_after < 3.5


def test_a_pull_from_a_holder_that_stops_serving_times_out_and_recomputes(monkeypatch):
    """A grants the lease, then serves no bytes (frozen, as under SIGSTOP): B's pull gives up after half
    the lease (1 s here), computes the prompt, and A's lease goes back."""
    prompt = _prompt(400, 14)
    full = (400 - 1) // BS

    async def frozen_read(self, req):
        await asyncio.sleep(3600)
        yield  # never reached: a generator that yields nothing for an hour

    monkeypatch.setattr(BlockServer, "_read", frozen_read)  # before the servers bind their endpoints

    async def run():
        async with Cluster(["agg", "agg"], replace(TCP, kv_lease_s=2.0)) as c:
            a, b = c.workers
            client = WorkerClient(RpcClient(token=c.token))
            cold, _ = await _generate(client, a.instance.address, prompt)
            t0 = time.monotonic()
            got, cached = await _generate(client, b.instance.address, prompt, _peer(a, full))
            took = time.monotonic() - t0
            await c.settle()
            await _no_pins(a, b)
            await client.close()
            return cold, got, cached, took, b.engine.stats()

    cold, got, cached, took, b = asyncio.run(run())
    assert got == cold and cached == 0
    assert b.peer_pull_failures == 1 and b.peer_pulled_blocks == 0
    assert took < 1.0 + 3.0  # the pull's bound (half the lease) plus computing the prompt


def test_over_the_pull_budget_a_request_computes_its_prompt(monkeypatch):
    """--kv-peer-max-pulls 1: two requests ask at once; one pulls, the other computes; both equal cold."""
    prompts = [_prompt(400, 15), _prompt(400, 16)]
    full = (400 - 1) // BS

    async def run():
        async with Cluster(["agg", "agg"], replace(TCP, kv_peer_max_pulls=1)) as c:
            a, b = c.workers
            lease_blocks = a.engine.lease_blocks

            async def slow_lease(lease_id: str, hashes: list[int]) -> list[int]:
                await asyncio.sleep(0.3)  # both asks overlap
                return await lease_blocks(lease_id, hashes)

            monkeypatch.setattr(a.engine, "lease_blocks", slow_lease)
            client = WorkerClient(RpcClient(token=c.token))
            cold = [(await _generate(client, a.instance.address, p))[0] for p in prompts]
            got = await asyncio.gather(*(_generate(client, b.instance.address, p, _peer(a, full)) for p in prompts))
            await c.settle()
            await _no_pins(a, b)
            await client.close()
            return cold, got, b.engine.stats()

    cold, got, b = asyncio.run(run())
    assert [g[0] for g in got] == cold
    assert sorted(g[1] for g in got) == [0, full * BS]
    assert b.peer_budget_refusals == 1 and b.peer_pulled_blocks == full and b.peer_pulls_in_flight == 0


def test_a_lease_nobody_pulls_or_gives_back_expires():
    """The asker vanished after the grant (killed between its ask and its pull): the lease's expiry
    frees the blocks (here 1 s)."""
    prompt = _prompt(300, 17)

    async def run():
        async with Cluster(["agg"], replace(TCP, kv_lease_s=1.0)) as c:
            a = c.workers[0]
            client = WorkerClient(RpcClient(token=c.token))
            await _generate(client, a.instance.address, prompt)
            hashes = block_hashes(a.engine, prompt)
            reply = await client.lease(a.instance.address, PeerLeaseRequest(
                lease_id="peer:vanished", fingerprint=a.engine.fingerprint, block_hashes=hashes))
            pinned = a.engine.stats().peer_lease_pinned
            await asyncio.sleep(1.5)
            await _no_pins(a)
            await client.close()
            assert a.leases is not None
            return reply.handle, pinned, a.leases.released["expired"]

    handle, pinned, expired = asyncio.run(run())
    assert handle is not None and len(handle.block_checksums) == len(handle.block_ids) == pinned == 300 // BS
    assert expired == 1
