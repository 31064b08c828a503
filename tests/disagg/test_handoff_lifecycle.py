"""Lifecycle of a KV handle: expiry, cancellation on both sides, failover, the local-prefill threshold,
and handles the decode worker cannot use (recomputed, never wrong)."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import uuid
from dataclasses import replace

import msgspec
import pytest

from kvrelay.frontend.config import FrontendConfig
from kvrelay.transfer import TransferStats
from kvrelay.workers.api.endpoints import Endpoint
from kvrelay.workers.api.messages import Empty, EngineOutput, EngineRequest, PrefillReply, SamplingParams
from kvrelay.workers.config import WorkerConfig
from tests.disagg.cluster import Cluster

# No lower tiers: these tests time prefills, and a prompt found in G2/G3 would skip them.
CFG = WorkerConfig(model="tiny", kv_cache_bytes=64 << 20, kv_transfer="tcp", kv_host_bytes=0, kv_disk_dir="off")


def _prompt(n: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2000) for _ in range(n)]


def _request(prompt: list[int], max_tokens: int = 8) -> EngineRequest:
    return EngineRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt,
                         sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _idle(stats) -> bool:
    return stats.free_blocks == stats.total_blocks and stats.held_requests == 0 and stats.running == 0


async def _prefill(c: Cluster, prompt: list[int]) -> PrefillReply:
    prefill = c.by_role("prefill")[0]
    async with c.service.rpc.call(prefill.instance.address, Endpoint.PREFILL, _request(prompt), PrefillReply) as stream:
        replies = [r async for r in stream]
    assert len(replies) == 1
    reply = replies[0]
    return reply


def test_unpulled_handle_frees_its_blocks_after_the_lease():
    async def run():
        async with Cluster(["prefill", "decode"], replace(CFG, kv_lease_s=0.5)) as c:
            prefill = c.by_role("prefill")[0]
            reply = await _prefill(c, _prompt(100))
            assert reply.handle is not None and len(reply.handle.block_ids) == 7
            held = prefill.engine.stats()
            assert held.held_requests == 1 and held.used_blocks == 7
            await asyncio.sleep(1.0)
            return prefill.engine.stats(), dict(prefill.leases.released)

    after, released = asyncio.run(run())
    assert _idle(after)
    assert released["expired"] == 1 and released["pulled"] == 0


def test_cancel_mid_prefill_frees_blocks_on_the_prefill_worker():
    async def run():
        # 64-token steps: a 3,000-token prompt prefills over ~47 steps, long enough to cancel inside.
        async with Cluster(["prefill", "decode"], replace(CFG, max_num_batched_tokens=64)) as c:
            prefill = c.by_role("prefill")[0]
            task = asyncio.create_task(c.generate(_prompt(3000), max_tokens=4))
            while prefill.engine.stats().running == 0:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            mid = prefill.engine.stats()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await c.settle()
            return mid, [w.engine.stats() for w in c.workers]

    mid, after = asyncio.run(run())
    assert mid.running == 1 and mid.used_blocks > 0
    assert all(_idle(s) for s in after), after


def test_cancel_mid_decode_frees_blocks_on_both_workers():
    async def run():
        async with Cluster(["prefill", "decode"], CFG) as c:
            agen = c.service.generate(c.model, c.card, _request(_prompt(600), max_tokens=3000))
            outputs = 0
            async for _ in agen:
                outputs += 1
                if outputs == 5:
                    break
            decode = c.by_role("decode")[0]
            busy = decode.engine.stats()
            await agen.aclose()  # the client left
            await c.settle()
            return busy, [w.engine.stats() for w in c.workers], dict(c.by_role("prefill")[0].leases.released)

    busy, after, released = asyncio.run(run())
    assert busy.running == 1 and busy.used_blocks >= 38
    assert all(_idle(s) for s in after), after
    assert released["pulled"] == 1


def test_below_the_threshold_prefill_stays_local():
    async def run():
        async with Cluster(["prefill", "decode"], CFG, FrontendConfig(disagg_min_tokens=64)) as c:
            short = [await c.generate(_prompt(n, n)) for n in (1, 10, 63)]
            decode = c.by_role("decode")[0]
            xfer_short = await c.service.rpc.unary(decode.instance.address, Endpoint.TRANSFER_STATS, Empty(), TransferStats)
            long = await c.generate(_prompt(200))
            counts = {w: c.service.remote.prefills.labels(where=w)._value.get() for w in ("local", "remote")}
            return short, long, xfer_short, decode.engine.stats(), counts

    short, long, xfer_short, decode, counts = asyncio.run(run())
    assert all(len(t) == 8 for t in short) and len(long) == 8
    assert xfer_short.reads == 0 and xfer_short.bytes_read == 0  # no transfer below the threshold
    assert counts == {"local": 3, "remote": 1}
    assert decode.remote_prefills == 1


def test_prefill_worker_lost_mid_prefill_completes_locally():
    """The prefill worker shuts down while prefilling: its in-flight stream fails, the frontend tries
    the next prefill worker (none left) and the decode worker prefills: same tokens as uninterrupted."""
    prompt = _prompt(3000, 2)

    async def run():
        async with Cluster(["agg"], CFG) as ref:
            want = await ref.generate(prompt, max_tokens=6)
        async with Cluster(["prefill", "decode"], replace(CFG, max_num_batched_tokens=64)) as c:
            prefill = c.by_role("prefill")[0]
            task = asyncio.create_task(c.generate(prompt, max_tokens=6))
            while prefill.engine.stats().running == 0:
                await asyncio.sleep(0.005)
            await prefill.close()
            c.workers.remove(prefill)
            got = await asyncio.wait_for(task, 60)
            failovers = c.service.remote.failovers._value.get()
            return want, got, failovers, c.by_role("decode")[0].engine.stats()

    want, got, failovers, decode = asyncio.run(run())
    assert got == want
    assert failovers == 1 and decode.remote_prefills == 0


def test_unusable_handles_are_recomputed_not_trusted():
    """A handle from another model (fingerprint) and a handle over a transport the decode worker does
    not speak (TCP prefill, NIXL decode) are both recomputed: same tokens, lease released at once."""
    pytest.importorskip("nixl_cu12" if importlib.util.find_spec("nixl_cu12") else "nixl")
    prompt = _prompt(300, 3)

    async def run():
        async with Cluster(["agg"], CFG) as ref:
            want = await ref.generate(prompt, max_tokens=6)
        async with Cluster(["prefill"], CFG) as c:
            decode = await c.add_worker("decode", kv_transfer="nixl")
            await c.service.pool.wait_for(lambda: len(c.service.pool.instances) == 2, 10)
            prefill = c.by_role("prefill")[0]
            results = []
            for tamper in (lambda h: msgspec.structs.replace(h, fingerprint="another-model"), lambda h: h):
                reply = await _prefill(c, prompt)
                req = replace_handle(_request(prompt, 6), tamper(reply.handle))
                tokens = list(reply.output.token_ids)
                async with c.service.rpc.call(decode.instance.address, Endpoint.GENERATE, req, EngineOutput) as stream:
                    async for out in stream:
                        tokens += out.token_ids
                results.append(tokens)
            await c.settle()
            return want, results, decode.engine.stats(), prefill.engine.stats(), dict(prefill.leases.released)

    want, results, decode, prefill, released = asyncio.run(run())
    assert results == [want, want]
    assert decode.pull_failures == 2 and decode.pulled_blocks == 0
    assert _idle(prefill) and released["released"] == 2


def replace_handle(req: EngineRequest, handle) -> EngineRequest:
    return msgspec.structs.replace(req, kv_handle=handle)


def test_prefill_worker_lost_mid_prefill_moves_to_the_other_prefill_worker():
    prompt = _prompt(3000, 4)

    async def run():
        async with Cluster(["agg"], CFG) as ref:
            want = await ref.generate(prompt, max_tokens=6)
        async with Cluster(["prefill", "prefill", "decode"], replace(CFG, max_num_batched_tokens=64)) as c:
            task = asyncio.create_task(c.generate(prompt, max_tokens=6))
            busy = None
            while busy is None:
                busy = next((w for w in c.by_role("prefill") if w.engine.stats().running), None)
                await asyncio.sleep(0.005)
            await busy.close()
            c.workers.remove(busy)
            got = await asyncio.wait_for(task, 60)
            await c.settle()
            (other,) = c.by_role("prefill")
            return (want, got, c.service.remote.failovers._value.get(), other.engine.stats(),
                    c.by_role("decode")[0].engine.stats())

    want, got, failovers, other, decode = asyncio.run(run())
    assert got == want
    assert failovers == 1
    assert other.prompt_tokens == len(prompt)  # the survivor prefilled it
    assert decode.remote_prefills == 1 and decode.pull_failures == 0


def test_migration_after_a_dead_decode_worker_reprefills_on_the_same_prefill_worker():
    """A decode worker that died before its deregistration was seen (a scale-down race): the attempt
    routed to it fails to connect after its remote prefill, and the migrated attempt prefills again on
    the same prefill worker, which may still hold the first attempt's handle. Every request completes
    with the tokens of an uninterrupted run (seen in the planner benchmark as "duplicate request id")."""
    from kvrelay.perf.serve_process import free_port
    from kvrelay.runtime.discovery import register_instance

    prompts = [_prompt(200, 10 + i) for i in range(6)]

    async def run():
        async with Cluster(["agg"], CFG) as ref:
            want = [await ref.generate(p, max_tokens=6) for p in prompts]
        async with Cluster(["prefill", "decode"], CFG) as c:
            real = c.by_role("decode")[0].instance
            dead = msgspec.structs.replace(real, instance_id=f"{real.instance_id}-dead",
                                           address=f"127.0.0.1:{free_port()}")  # nothing listens there
            await register_instance(c._disc(), dead)
            await c.service.pool.wait_for(lambda: dead.instance_id in c.service.pool.instances, 10)
            got = await asyncio.gather(*(c.generate(p, max_tokens=6) for p in prompts))
            await c.settle()
            prefill = c.by_role("prefill")[0].engine.stats()
            return want, got, c.service.migrations._value.get(), prefill

    want, got, migrations, prefill = asyncio.run(run())
    assert got == want
    assert migrations >= 1  # some attempts went to the dead worker and moved on
    assert _idle(prefill)
