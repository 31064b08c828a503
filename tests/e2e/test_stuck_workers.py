"""Issue 29, stuck workers: a worker frozen with SIGSTOP keeps its connections open and answers nothing.
Its streams move to the healthy worker (no output for `--worker-stall-timeout` from a worker that also
stopped reporting load, or its leaving discovery, whichever comes first) and finish with the text an
uninterrupted greedy run gives; a frozen prefill worker's requests are prefilled locally."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx

from kvrelay.runtime.discovery import DiscoveryConfig, list_instances, make_discovery
from tests.e2e.serve import Serve, worker_stats

MODEL = "kvrelay-tiny"
STALL_S = 3.0
STREAMS, TOKENS = 8, 600  # ~3 s a stream on the mocker: frozen mid-stream


async def _instances(srv: Serve):
    disc = make_discovery(DiscoveryConfig(discovery="file", discovery_dir=srv.discovery_dir))
    await disc.start()
    try:
        return await list_instances(disc, "default")
    finally:
        await disc.close()


async def _complete(client: httpx.AsyncClient, base: str, prompt: str, started: list[int] | None = None,
                    tokens: int = TOKENS) -> str:
    """The streamed text of one greedy completion (asserts it finished normally)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
            "seed": 7, "stream": True}
    text, finish = [], None
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if started is not None and not text:
                started.append(1)
            text.append(event["choices"][0]["text"])
            finish = event["choices"][0]["finish_reason"] or finish
    assert finish == "length"
    return "".join(text)


def _counter(srv: Serve, name: str) -> dict[str, float]:
    text = httpx.get(f"{srv.base_url}/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M)}


def test_frozen_decode_worker_streams_move_and_keep_their_text(tmp_path):
    srv = Serve(tmp_path, "--engine", "mocker", "--worker-stall-timeout", str(STALL_S), workers=2).start()
    frozen = None
    try:
        prompts = [f"frozen worker {i} " * 8 for i in range(STREAMS)]

        async def run() -> tuple[list[str], list[str], float]:
            async with httpx.AsyncClient(timeout=120) as client:
                reference = await asyncio.gather(*[_complete(client, srv.base_url, p) for p in prompts])
                started: list[int] = []
                tasks = [asyncio.create_task(_complete(client, srv.base_url, p, started)) for p in prompts]
                while len(started) < STREAMS:
                    await asyncio.sleep(0.02)
                stats = await worker_stats(DiscoveryConfig(discovery="file", discovery_dir=srv.discovery_dir),
                                           token=srv.internal_token)
                busy = [pid for pid, s in stats.values() if s.running > 0]
                assert len(busy) >= 1, stats
                nonlocal frozen
                frozen = busy[0]
                os.kill(frozen, signal.SIGSTOP)
                t0 = time.monotonic()
                texts = await asyncio.gather(*tasks)
                return reference, texts, time.monotonic() - t0

        reference, texts, took = asyncio.run(run())
        assert texts == reference  # every stream finished, with the text of an uninterrupted greedy run
        # the stall timeout (or the 10 s discovery lease, if sooner) plus one request's time, with margin
        print(f"took {took:.1f} s")
        assert took < STALL_S + 15, took
        assert sum(_counter(srv, "kvrelay_frontend_migrations_total").values()) >= 1
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        srv.stop()


def test_frozen_prefill_worker_falls_back_to_local_prefill(tmp_path):
    srv = Serve(tmp_path, "--engine", "mocker", "--prefill-workers", "1", "--decode-workers", "1",
                "--worker-stall-timeout", str(STALL_S), workers=None).start()
    frozen = None
    try:
        def prompts(tag: str) -> list[str]:  # past --disagg-min-tokens 512, nothing cached on the decode side
            return [f"{tag} {i} " + "word " * 700 for i in range(4)]

        async def run() -> tuple[list[str], float, dict, dict]:
            nonlocal frozen
            async with httpx.AsyncClient(timeout=120) as client:
                await asyncio.gather(*[_complete(client, srv.base_url, p, tokens=100) for p in prompts("warm")])
                before = _counter(srv, "kvrelay_frontend_prefills_total")
                assert before['{where="remote"}'] >= 4, before  # the prefill worker did prefill them
                frozen = int(next(i for i in await _instances(srv) if i.role == "prefill").labels["pid"])
                os.kill(frozen, signal.SIGSTOP)
                t0 = time.monotonic()
                texts = await asyncio.gather(*[_complete(client, srv.base_url, p, tokens=100)
                                               for p in prompts("frozen")])
                took = time.monotonic() - t0
                after = _counter(srv, "kvrelay_frontend_prefills_total")
                os.kill(frozen, signal.SIGCONT)
                frozen = None
                again = await asyncio.gather(*[_complete(client, srv.base_url, p, tokens=100)
                                               for p in prompts("frozen")])
                assert again == texts  # the same greedy text as a run with every worker up
                return texts, took, before, after

        texts, took, before, after = asyncio.run(run())
        print(f"took {took:.1f} s")
        assert took < STALL_S + 15, took
        local = '{where="local"}'
        assert after[local] - before[local] >= 4, (before, after)
        assert after['{where="remote"}'] == before['{where="remote"}'], (before, after)
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        srv.stop()
