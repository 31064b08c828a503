"""Issue 29: with the default `--worker-wait` (15 s), a restart of the only worker queues requests
instead of failing them (the probe saw every request fail for ~6 s with the old default 0): requests
that arrive while the worker is down, and a stream that was on it, are served once it is back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx

from tests.e2e.serve import Serve, alive

MODEL = "kvrelay-tiny"


async def _stream(client: httpx.AsyncClient, base: str, prompt: str, tokens: int) -> int:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    used = 0
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                used = (event.get("usage") or {}).get("completion_tokens", used)
    return used


def test_requests_wait_while_the_only_worker_restarts(tmp_path):
    srv = Serve(tmp_path, "--engine", "mocker", workers=1).start()  # no --worker-wait: the default
    try:
        (worker,) = srv.children()

        async def run() -> tuple[list[int], float]:
            async with httpx.AsyncClient(timeout=60) as client:
                on_worker = asyncio.create_task(_stream(client, srv.base_url, "in flight", 1500))
                await asyncio.sleep(1.0)  # the stream is under way on the only worker
                os.kill(worker, signal.SIGKILL)
                while alive(worker):
                    await asyncio.sleep(0.01)
                t0 = time.monotonic()
                arriving = [asyncio.create_task(_stream(client, srv.base_url, f"while down {i}", 20))
                            for i in range(6)]
                whole = await client.post(f"{srv.base_url}/v1/completions", json={
                    "model": MODEL, "prompt": "whole while down", "max_tokens": 5})
                assert whole.status_code == 200, whole.text
                done = await asyncio.gather(on_worker, *arriving)
                return done, time.monotonic() - t0

        done, took = asyncio.run(run())
        assert done == [1500] + [20] * 6  # the migrated stream completed, none failed
        assert took < 15, took  # served once the restarted worker was up, within --worker-wait
        assert srv.children() and srv.children() != [worker]  # the supervisor restarted it
    finally:
        srv.stop()
