"""Disaggregated serving gives the same greedy tokens as aggregated serving, over NIXL and over TCP.

Real parts: native engines on the tiny model, real transfer engines (the `nixl` package's UCX agent,
or the TCP block server), the request plane over loopback, the frontend's routing and handoff logic.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest

from kvrelay.frontend.config import FrontendConfig
from kvrelay.transfer import TransferStats
from kvrelay.workers.api.endpoints import Endpoint
from kvrelay.workers.api.messages import Empty
from kvrelay.workers.config import WorkerConfig
from tests.disagg.cluster import Cluster

# 1 to 3,000 tokens: shorter than a block, exact multiples of the block size, and everything between.
LENGTHS = [1, 3, 15, 16, 17, 31, 32, 33, 64, 100, 127, 250, 511, 700, 1000, 1333, 1600, 2048, 2500, 3000]
CFG = WorkerConfig(model="tiny", kv_cache_bytes=96 << 20, max_num_batched_tokens=1024, kv_disk_bytes=256 << 20,
                   kv_host_bytes=64 << 20)


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 2000) for _ in range(n)] for n in LENGTHS]


def _transfer_kinds() -> list:
    try:
        from kvrelay.transfer import load_nixl_api

        load_nixl_api()
        nixl = pytest.param("nixl")
    except ImportError:
        nixl = pytest.param("nixl", marks=pytest.mark.skip(reason="nixl is not installed"))
    return [nixl, "tcp"]


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    async def run():
        async with Cluster(["agg"], CFG) as agg:
            return [await agg.generate(p, max_tokens=12) for p in _prompts()]

    return asyncio.run(run())


@pytest.mark.parametrize("kind", _transfer_kinds())
def test_disaggregated_tokens_equal_aggregated(reference, kind):
    async def run():
        async with Cluster(["prefill", "decode"], replace(CFG, kv_transfer=kind)) as c:
            got = [await c.generate(p, max_tokens=12) for p in _prompts()]
            await c.settle()
            prefill, decode = c.by_role("prefill")[0], c.by_role("decode")[0]
            stats = decode.engine.stats()
            xfer = await c.service.rpc.unary(decode.instance.address, Endpoint.TRANSFER_STATS, Empty(), TransferStats)
            remote = c.service.remote.prefills.labels(where="remote")._value.get()
            return got, stats, prefill.engine.stats(), xfer, remote, decode.engine.kv_layout().block_bytes

    got, decode_stats, prefill_stats, xfer, remote, block_bytes = asyncio.run(run())
    for n, want, have in zip(LENGTHS, reference, got, strict=True):
        assert have == want, f"{n}-token prompt: disaggregated {have} != aggregated {want}"
    # Every prompt was prefilled remotely and pulled; nothing recomputed, nothing left held.
    assert remote == len(LENGTHS)
    assert decode_stats.remote_prefills == len(LENGTHS) and decode_stats.pull_failures == 0
    assert decode_stats.pulled_blocks == sum(-(-n // 16) for n in LENGTHS)
    assert xfer.kind == kind and xfer.reads == len(LENGTHS) and xfer.failures == 0
    assert xfer.bytes_read == decode_stats.pulled_blocks * block_bytes
    for s in (decode_stats, prefill_stats):
        assert s.free_blocks == s.total_blocks and s.held_requests == 0


def test_decode_worker_pulls_only_what_it_lacks():
    """A follow-up turn whose history the decode worker already holds pulls only the new blocks, and
    still matches aggregated serving token for token."""
    rng = random.Random(7)
    history = [rng.randrange(3, 2000) for _ in range(400)]
    follow = history + [rng.randrange(3, 2000) for _ in range(90)]

    async def run(roles):
        async with Cluster(roles, CFG, FrontendConfig(disagg_min_tokens=0)) as c:
            first = await c.generate(history, max_tokens=4)
            await asyncio.sleep(0.3)  # KV events reach the router's index
            second = await c.generate(follow, max_tokens=6)
            await c.settle()
            return first, second, [w.engine.stats() for w in c.by_role("decode")]

    want = asyncio.run(run(["agg"]))[:2]
    first, second, (decode,) = asyncio.run(run(["prefill", "decode"]))
    assert (first, second) == want
    # 400 tokens -> 25 blocks pulled; the follow-up: 490 tokens = 31 blocks, of which the decode worker
    # holds the 25 full blocks of the first prompt (its first token's block is not full), so 6 pulled.
    assert decode.remote_prefills == 2
    assert decode.pulled_blocks == 25 + 6
    assert decode.prefix_hit_tokens == 400


def test_seeded_sampling_disaggregated_equals_aggregated():
    """A seeded *sampled* request draws the same tokens disaggregated (first token on the prefill
    worker, the rest on the decode worker) as aggregated: the generator is seeded per position."""
    prompts = _prompts(11)[5:12]
    params = [dict(temperature=1.3, seed=100 + i, top_p=0.95) for i in range(len(prompts))]

    async def run(roles):
        async with Cluster(roles, replace(CFG, kv_transfer="tcp"), FrontendConfig(disagg_min_tokens=0)) as c:
            out = [await c.generate(p, max_tokens=10, **kw) for p, kw in zip(prompts, params, strict=True)]
            remote = c.service.remote.prefills.labels(where="remote")._value.get()
            return out, remote

    want, _ = asyncio.run(run(["agg"]))
    got, remote = asyncio.run(run(["prefill", "decode"]))
    assert remote == len(prompts)
    assert got == want
    greedy_like = sum(len(set(t)) <= 2 for t in want)
    assert greedy_like == 0, "temperature 1.3 should give varied tokens; the test would prove little"


def test_sampling_fields_disaggregated_equal_aggregated():
    """Penalties, logit_bias, min_tokens and min_p give the same tokens disaggregated: the decode worker
    counts the prefill worker's first token as output, as the aggregated engine does."""
    prompts = _prompts(13)[3:8]
    params = [dict(repetition_penalty=0.4, frequency_penalty=-1.0), dict(presence_penalty=-2.0, frequency_penalty=-2.0),
              dict(frequency_penalty=1.5, logit_bias={t: 6.0 for t in range(50, 2000, 150)}),
              dict(min_tokens=6, stop_token_ids=[9]), dict(temperature=1.2, seed=5, min_p=0.2, presence_penalty=0.5)]

    async def run(roles):
        async with Cluster(roles, replace(CFG, kv_transfer="tcp"), FrontendConfig(disagg_min_tokens=0)) as c:
            out = [await c.generate(p, max_tokens=12, **kw) for p, kw in zip(prompts, params, strict=True)]
            plain = [await c.generate(p, max_tokens=12) for p in prompts]
            return out, plain, c.service.remote.prefills.labels(where="remote")._value.get()

    want, plain, _ = asyncio.run(run(["agg"]))
    got, _, remote = asyncio.run(run(["prefill", "decode"]))
    assert remote == 2 * len(prompts)
    assert got == want
    assert [want[i] != plain[i] for i in (0, 1, 2, 4)] == [True] * 4  # the fields did change the tokens


def test_mocker_disaggregated_equals_aggregated():
    """The mocker's prefill/decode roles: same tokens as its aggregated serving, blocks accounted."""
    cfg = WorkerConfig(model="tiny", engine="mocker", mocker_speedup=0.0, mocker_num_blocks=4096)
    prompts = _prompts(3)

    async def run(roles, **kw):
        async with Cluster(roles, replace(cfg, **kw)) as c:
            out = [await c.generate(p, max_tokens=10) for p in prompts]
            await c.settle()
            return out, [w.engine.stats() for w in c.workers]

    want, _ = asyncio.run(run(["agg"]))
    got, stats = asyncio.run(run(["prefill", "decode"]))
    assert got == want
    decode = stats[1]
    assert decode.remote_prefills == len(prompts) and decode.pulled_blocks == sum(-(-n // 16) for n in LENGTHS)
    assert all(s.free_blocks == s.total_blocks and s.held_requests == 0 for s in stats)


def test_mocker_pull_takes_the_simulated_transfer_time():
    """At 0.1 Gbit/s a 1,600-token prompt's 100 blocks take 100 * block_bytes * 8 / 1e8 s to pull."""
    prompt = _prompts(5)[16]
    cfg = WorkerConfig(model="tiny", engine="mocker", mocker_speedup=1.0, mocker_transfer_gbps=0.1)

    async def run():
        async with Cluster(["prefill", "decode"], cfg) as c:
            decode = c.by_role("decode")[0]
            modeled = decode.engine.simulated_transfer_seconds(-(-len(prompt) // 16))
            t0 = asyncio.get_running_loop().time()
            await c.generate(prompt, max_tokens=2)
            return modeled, asyncio.get_running_loop().time() - t0

    modeled, took = asyncio.run(run())
    assert modeled > 0.05
    assert took >= modeled


def test_decode_worker_fed_by_handoffs_keeps_max_num_seqs():
    """Handed-off sequences whose KV arrives while `max_num_seqs` run wait READY instead of joining the
    batch: the decode worker never runs more than the limit, and every request still gets the tokens of
    aggregated serving (the limit used to be ignored for pulled sequences)."""
    cfg = WorkerConfig(model="tiny", engine="mocker", mocker_speedup=50.0, mocker_num_blocks=4096,
                       max_num_seqs=2)
    prompts = _prompts(4)[5:13]  # 8 prompts of 31..1,333 tokens

    async def run(roles):
        async with Cluster(roles, cfg) as c:
            peak = 0
            done = asyncio.Event()

            async def watch():
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, max(w.engine.stats().running for w in c.workers))
                    await asyncio.sleep(0.002)

            watcher = asyncio.create_task(watch())
            out = await asyncio.gather(*(c.generate(p, max_tokens=40) for p in prompts))
            done.set()
            await watcher
            await c.settle()
            return out, peak, [w.engine.stats() for w in c.workers]

    want, _, _ = asyncio.run(run(["agg"]))
    got, peak, stats = asyncio.run(run(["prefill", "decode"]))
    assert got == want
    assert peak <= 2, f"a decode worker ran {peak} sequences with --max-num-seqs 2"
    assert stats[1].remote_prefills == len(prompts)
    assert all(s.free_blocks == s.total_blocks and s.held_requests == 0 for s in stats)
