"""Disaggregated vLLM: a vLLM prefill worker hands KV to a vLLM decode worker through vLLM's
NixlConnector (real `nixl`), routed by kvrelay's frontend. Greedy tokens equal aggregated vLLM's;
requests (finished or abandoned by their clients) leave both engines' KV where it started."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from kvrelay.runtime.discovery import DiscoveryConfig
from tests.e2e.serve import wait_idle, worker_stats
from tests.e2e.test_serve_disagg import _metric, _wait_all_workers
from tests.vllm.conftest import MODEL, vllm_serve

_rng = random.Random(15)
LENGTHS = (1, 7, 31, 32, 33, 100, 511, 777, 1500, 2000)
PROMPTS = [[_rng.randrange(3, 49000) for _ in range(n)] for n in LENGTHS]
ALL_REMOTE = {"KVRELAY_DISAGG_MIN_TOKENS": "1"}  # every prompt is prefilled on the prefill worker


def complete(base_url: str, prompt, max_tokens: int = 16) -> list[str]:
    r = httpx.post(f"{base_url}/v1/completions", timeout=300, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "logprobs": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[list[str]]:
    srv = vllm_serve(tmp_path_factory.mktemp("vllm-agg"), workers=1)
    try:
        return [complete(srv.base_url, p) for p in PROMPTS]
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def disagg(tmp_path_factory, reference):
    srv = vllm_serve(tmp_path_factory.mktemp("vllm-pd"), "--prefill-workers", "1", "--decode-workers", "1",
                     workers=None, env=ALL_REMOTE)
    _wait_all_workers(srv, 2, timeout=600)
    yield srv
    srv.stop()


def stats(srv) -> dict:
    discovery = DiscoveryConfig(discovery="file", discovery_dir=srv.discovery_dir)
    return asyncio.run(wait_idle(discovery, timeout=60, token=srv.internal_token))


def settled(srv, start: dict, timeout: float = 60.0) -> dict:
    """Wait until every worker's KV usage is back to `start` (the prefill side frees a prompt's blocks
    when the decode side's read is done)."""
    discovery = DiscoveryConfig(discovery="file", discovery_dir=srv.discovery_dir)
    deadline = time.monotonic() + timeout
    while True:
        now = asyncio.run(worker_stats(discovery, token=srv.internal_token))
        if all(now[w][1].used_blocks == start[w][1].used_blocks for w in start) or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def test_disaggregated_tokens_equal_aggregated_for_1_to_2000_token_prompts(disagg, reference):
    remote_before = _metric(disagg.base_url, 'kvrelay_frontend_prefills_total{where="remote"}')
    before = {w: s for w, (_, s) in stats(disagg).items()}
    got = [complete(disagg.base_url, p) for p in PROMPTS]
    for n, ours, theirs in zip(LENGTHS, got, reference, strict=True):
        assert ours == theirs, f"prompt of {n} tokens"
    assert _metric(disagg.base_url, 'kvrelay_frontend_prefills_total{where="remote"}') - remote_before == len(PROMPTS)
    after = {w: s for w, (_, s) in stats(disagg).items()}
    (decode,) = [w for w in after if after[w].remote_prefills > before[w].remote_prefills]
    assert after[decode].remote_prefills - before[decode].remote_prefills == len(PROMPTS)
    assert after[decode].pull_failures == before[decode].pull_failures  # every handle was used
    # vLLM read the prompts' KV over NIXL instead of computing it (its connector's hit counter)
    full_blocks = sum(n // 32 for n in LENGTHS)
    assert after[decode].pulled_blocks - before[decode].pulled_blocks >= full_blocks


def test_200_disaggregated_requests_leave_kv_usage_where_it_started(disagg):
    start = stats(disagg)

    async def run() -> None:
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(timeout=300) as client:
            async def one(i: int) -> None:
                prompt = PROMPTS[6][: 100 + i] if i % 2 else [(i * 7919 + k) % 49000 + 3 for k in range(64 + i)]
                async with sem:
                    r = await client.post(f"{disagg.base_url}/v1/completions", json={
                        "model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0})
                    assert r.status_code == 200, r.text

            await asyncio.gather(*(one(i) for i in range(200)))

    peak: dict[str, int] = {}

    async def sample() -> None:  # the gauge moves under load (so "back where it started" means something)
        discovery = DiscoveryConfig(discovery="file", discovery_dir=disagg.discovery_dir)
        while True:
            for w, (_, s) in (await worker_stats(discovery, token=disagg.internal_token)).items():
                peak[w] = max(peak.get(w, 0), s.used_blocks)
            await asyncio.sleep(0.2)

    async def run_and_sample() -> None:
        sampler = asyncio.create_task(sample())
        try:
            await run()
        finally:
            sampler.cancel()

    asyncio.run(run_and_sample())
    assert all(peak[w] > start[w][1].used_blocks for w in start), (peak, start)
    end = settled(disagg, start)
    for w in start:
        assert end[w][1].used_blocks == start[w][1].used_blocks, (w, start[w][1], end[w][1])


def test_a_client_that_disconnects_frees_blocks_on_both_workers(disagg):
    start = stats(disagg)

    async def leave_after_first_chunk(prompt) -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(timeout=300) as client:
            async with client.stream("POST", f"{disagg.base_url}/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for _ in r.aiter_lines():
                    break  # decoding has started on the decode worker: leave

    async def leave_during_prefill(prompt) -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 400, "stream": True}
        async with httpx.AsyncClient(timeout=300) as client:
            try:
                await asyncio.wait_for(client.post(f"{disagg.base_url}/v1/completions", json=body), 0.3)
            except asyncio.TimeoutError:
                pass  # the 2,000-token prefill was still running on the prefill worker

    async def run() -> None:
        await asyncio.gather(*(leave_after_first_chunk(PROMPTS[7][:200 + 50 * i]) for i in range(4)))
        await asyncio.gather(*(leave_during_prefill([t + i for t in PROMPTS[9]]) for i in range(3)))

    asyncio.run(run())
    end = settled(disagg, start)
    for w in start:
        assert end[w][1].used_blocks == start[w][1].used_blocks, (w, start[w][1], end[w][1])
        assert end[w][1].running == end[w][1].waiting == 0
