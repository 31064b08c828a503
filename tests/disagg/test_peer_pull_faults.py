"""The cluster KV pool under faults, with real worker processes (`kvrelay worker`, native engine, tiny
model, TCP transfer): the holder SIGKILLed while peers ask and pull, SIGSTOPped (frozen: the ask times
out), and flooded so that G1 would evict the blocks it lends. Every request completes with the greedy
tokens of a cold run, and neither side keeps a pinned or leased block afterwards (with the default
30 s lease: what is freed, is freed by the give-back paths, not by expiry).

The frozen-during-the-pull case (the lease granted, then no bytes) is timed deterministically in
test_peer_pull_g2_verify.py; here a freeze lands where it lands.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from kvrelay.runtime.rpc import RpcClient
from kvrelay.workers.api.endpoints import Endpoint
from kvrelay.workers.api.messages import EngineOutput, EngineRequest, EngineStats, KvPeer, SamplingParams
from tests.disagg.test_peer_pull import BS, _prompt
from tests.kvbm.worker_proc import WorkerProcess, stats

FLAGS = ("--kv-transfer", "tcp", "--kv-disk-dir", "off", "--kv-host-bytes", "0", "--max-num-batched-tokens", "1024")


async def _generate(address: str, prompt: list[int], peer: KvPeer | None = None, n: int = 10) -> tuple[list[int], int]:
    client = RpcClient()
    try:
        req = EngineRequest(request_id=f"r{time.monotonic_ns()}", prompt_token_ids=prompt, kv_peer=peer,
                            sampling=SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0))
        outs = await client.call(address, Endpoint.GENERATE, req, EngineOutput).collect()
        return [t for o in outs for t in o.token_ids], max(o.num_cached_tokens for o in outs)
    finally:
        await client.close()


async def _clean(address: str, timeout: float = 5.0) -> EngineStats:
    """Wait (well within a lease's 30 s) until nothing is pinned, leased, running or waiting."""
    end = time.monotonic() + timeout
    while True:
        s = await stats(address)
        if s.peer_lease_pinned == 0 and s.free_blocks == s.total_blocks and s.running == s.waiting == 0:
            return s
        assert time.monotonic() < end, s
        await asyncio.sleep(0.1)


@pytest.fixture
def pair(tmp_path: Path):
    procs: list[WorkerProcess] = []

    def start(*flags: str) -> WorkerProcess:
        w = WorkerProcess(tmp_path, *FLAGS, *flags)
        procs.append(w)
        return w

    yield start
    for w in procs:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGCONT)
            w.stop()


def _peer(address: str, prompt: list[int]) -> KvPeer:
    return KvPeer(instance_id="holder", address=address, blocks=(len(prompt) - 1) // BS)


def test_a_killed_holder_costs_recomputes_never_a_request(pair):
    a, b = pair(), pair()
    prompts = [_prompt(600, 20 + i) for i in range(4)]

    async def run():
        cold = [(await _generate(a.address, p))[0] for p in prompts]
        pulls = []
        for p in prompts:  # staggered: the kill lands between the first requests' asks and pulls and the last's
            pulls.append(asyncio.create_task(_generate(b.address, p, _peer(a.address, p))))
            await asyncio.sleep(0.004)
        a.proc.kill()
        a.proc.wait()
        got = await asyncio.gather(*pulls)
        after, cached_after = await _generate(b.address, _prompt(600, 30), _peer(a.address, prompts[0]))
        ref, _ = await _generate(b.address, _prompt(600, 30))
        return cold, [g[0] for g in got], after, cached_after, ref, await _clean(b.address)

    cold, got, after, cached_after, ref, s = asyncio.run(run())
    assert got == cold
    assert after == ref and cached_after == 0  # a dead holder: the ask is refused, the prompt computed
    # the kill cut into at least one of the four (one more fallback is the request after it)
    assert s.peer_asked == 5 and s.peer_fallbacks + s.peer_pull_failures >= 2


def test_a_frozen_holder_times_out_the_ask_and_gives_the_lease_back_when_it_thaws(pair):
    a, b = pair(), pair()
    prompt, later = _prompt(600, 40), _prompt(600, 41)

    async def run():
        cold, _ = await _generate(a.address, prompt)
        a.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        got, cached = await _generate(b.address, prompt, _peer(a.address, prompt))
        took = time.monotonic() - t0
        a.proc.send_signal(signal.SIGCONT)
        # Whatever the thawed holder makes of the late ask (here its RPC server dropped the cancelled call;
        # a grant would meet B's give-back: test_peer_lease_give_back.py), nothing stays pinned for the
        # lease's 30 s.
        thawed = await _clean(a.address)
        cold_later, _ = await _generate(a.address, later)
        pulled, cached_later = await _generate(b.address, later, _peer(a.address, later))
        return cold, got, cached, took, thawed, cold_later, pulled, cached_later, await _clean(b.address)

    cold, got, cached, took, thawed, cold_later, pulled, cached_later, b_stats = asyncio.run(run())
    assert got == cold and cached == 0
    assert took < 2.0 + 4.0  # the ask's 2 s bound, then computing the prompt
    assert thawed.peer_lease_pinned == 0
    assert pulled == cold_later and cached_later == (600 - 1) // BS * BS  # the thawed holder lends again
    assert b_stats.peer_fallbacks == 1 and b_stats.peer_pulled_blocks == (600 - 1) // BS


def test_flooding_the_holder_while_it_lends_never_corrupts_a_pull(pair):
    """The holder's G1 has 128 blocks; while a peer leases and pulls a 37-block prefix, two 1000-token
    prompts arrive that need more than the free blocks: they evict what is not pinned, never the lease."""
    a, b = pair("--kv-cache-bytes", str(128 * 32768)), pair()

    async def lent(before: int) -> None:
        end = time.monotonic() + 5
        while (await stats(a.address)).peer_lent_blocks == before and time.monotonic() < end:
            await asyncio.sleep(0.005)

    async def run():
        results = []
        for i in range(3):
            prompt = _prompt(600, 50 + i)
            cold, _ = await _generate(a.address, prompt)
            before = (await stats(a.address)).peer_lent_blocks
            pull = asyncio.create_task(_generate(b.address, prompt, _peer(a.address, prompt)))
            await lent(before)
            floods = [asyncio.create_task(_generate(a.address, _prompt(1000, 60 + 2 * i + k), n=2)) for k in range(2)]
            got, cached = await pull
            await asyncio.gather(*floods)
            results.append((cold, got, cached))
        return results, await _clean(a.address), await _clean(b.address)

    results, a_stats, b_stats = asyncio.run(run())
    for cold, got, _ in results:
        assert got == cold
    assert a_stats.peer_lent_blocks > 0 and b_stats.peer_pulled_blocks > 0
    assert b_stats.peer_verify_failures == 0
