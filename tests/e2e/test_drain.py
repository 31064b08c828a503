"""Issue 14: SIGTERM drains. `kvrelay serve`, `kvrelay frontend` and a worker stop taking work, let the
streams in flight finish up to `--drain-timeout`, end the rest with an SSE error event and `[DONE]`;
a worker that exits after SIGTERM is not restarted by `kvrelay serve`'s supervisor."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from kvrelay.perf.serve_process import free_port
from tests.e2e.serve import Serve, alive

MODEL = "kvrelay-tiny"
STREAMS, TOKENS = 8, 2000
# 2,000 mocker steps of 5 ms / 2: each stream lasts ~5 s, long enough to signal mid-stream.
MOCKER = ("--engine", "mocker", "--model", "tiny", "--mocker-speedup", "2")


class Streams:
    """STREAMS concurrent 2,000-token completions; `all_started` once each has sent a chunk."""

    def __init__(self, base_url: str):
        self.base_url, self.started, self.all_started = base_url, 0, asyncio.Event()

    async def one(self, client: httpx.AsyncClient, i: int) -> dict:
        body = {"model": MODEL, "prompt": f"stream {i}", "max_tokens": TOKENS, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        got: dict = {"done": False, "error": None, "tokens": None}
        first = True
        async with client.stream("POST", f"{self.base_url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                assert not got["done"], "nothing may follow [DONE]"
                if line == "data: [DONE]":
                    got["done"] = True
                    continue
                event = json.loads(line[6:])
                got["error"] = event.get("error", got["error"])
                if event.get("usage"):
                    got["tokens"] = event["usage"]["completion_tokens"]
                if first:
                    first, self.started = False, self.started + 1
                    if self.started == STREAMS:
                        self.all_started.set()
        return got

    async def run(self, signal_them: Callable[[httpx.AsyncClient], Awaitable[None]]) -> tuple[list[dict], float]:
        """Start the streams, call `signal_them` once all are under way; every stream's end and the
        seconds from the signal until the last one ended (the client's timeout catches a hang)."""
        async with httpx.AsyncClient(timeout=httpx.Timeout(90)) as client:
            tasks = [asyncio.create_task(self.one(client, i)) for i in range(STREAMS)]
            await asyncio.wait_for(self.all_started.wait(), 60)
            t0 = time.monotonic()
            await signal_them(client)
            results = await asyncio.gather(*tasks)
            return results, time.monotonic() - t0


async def refuses_new_work(client: httpx.AsyncClient, base_url: str) -> None:
    """While draining: /ready is 503 and a new request gets OpenAI's 503 `draining` error."""
    deadline = time.monotonic() + 10
    while (await client.get(f"{base_url}/ready")).status_code != 503:
        assert time.monotonic() < deadline, "/ready stayed 200 after SIGTERM"
        await asyncio.sleep(0.02)
    r = await client.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "late", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining", r.text


def sigterm_then_check(proc: subprocess.Popen, base_url: str):
    async def signal_them(client: httpx.AsyncClient) -> None:
        proc.send_signal(signal.SIGTERM)
        await refuses_new_work(client, base_url)
    return signal_them


def assert_all_completed(results: list[dict]) -> None:
    assert all(r["done"] and r["error"] is None and r["tokens"] == TOKENS for r in results), results


def assert_all_ended_with_error(results: list[dict], seconds: float, timeout: float) -> None:
    for r in results:
        assert r["done"] and r["error"] is not None and r["error"]["code"] == "draining", r
        assert r["tokens"] is None  # cut before its usage chunk: it did not finish
    assert seconds < timeout + 10, seconds


def test_serve_drains_streams_within_the_timeout(tmp_path):
    srv = Serve(tmp_path, *MOCKER, "--drain-timeout", "120", workers=1).start()
    children = srv.children()
    try:
        results, _ = asyncio.run(Streams(srv.base_url).run(sigterm_then_check(srv.proc, srv.base_url)))
        assert_all_completed(results)
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()
    assert not any(alive(p) for p in children)
    assert "Traceback" not in srv.read_log()


def test_serve_ends_streams_with_an_error_after_a_short_timeout(tmp_path):
    srv = Serve(tmp_path, *MOCKER, "--drain-timeout", "1", workers=1).start()
    try:
        results, seconds = asyncio.run(Streams(srv.base_url).run(sigterm_then_check(srv.proc, srv.base_url)))
        assert_all_ended_with_error(results, seconds, 1)
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()
    assert "Traceback" not in srv.read_log()


def test_sigtermed_worker_finishes_its_streams_and_is_not_restarted(tmp_path):
    srv = Serve(tmp_path, *MOCKER, "--router-mode", "round-robin", workers=2).start()
    try:
        victim = srv.children()[0]

        async def signal_worker(client: httpx.AsyncClient) -> None:
            os.kill(victim, signal.SIGTERM)

        results, _ = asyncio.run(Streams(srv.base_url).run(signal_worker))
        assert_all_completed(results)  # round-robin gave it half of them: drained, not migrated
        deadline = time.monotonic() + 20
        while alive(victim) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(victim)
        time.sleep(3)  # the supervisor's first restart would come after 1 s
        assert len(srv.children()) == 1 and "not restarting" in srv.read_log()
        r = httpx.post(f"{srv.base_url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200 and httpx.get(f"{srv.base_url}/ready").status_code == 200
    finally:
        assert srv.stop() == 0


@pytest.fixture
def frontend_and_worker(tmp_path: Path):
    common = ["--discovery", "file", "--discovery-dir", str(tmp_path / "discovery"), "--events", "inproc"]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "procs.log", "w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "kvrelay.cli.main", "worker", *MOCKER, *common],
                                  stdout=subprocess.DEVNULL, stderr=log, env=env)
        frontend = subprocess.Popen([sys.executable, "-m", "kvrelay.cli.main", "frontend", "--http-port", str(port),
                                     "--drain-timeout", "1", *common], stdout=log, stderr=log, env=env)
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                assert frontend.poll() is None and worker.poll() is None, (tmp_path / "procs.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "procs.log").read_text()
                try:
                    if httpx.get(f"{base_url}/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            yield frontend, worker, base_url
        finally:
            for p in (frontend, worker):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(30)
                    except subprocess.TimeoutExpired:
                        p.kill()
    assert "Traceback" not in (tmp_path / "procs.log").read_text()


def test_kvrelay_frontend_drains_on_sigterm(frontend_and_worker):
    frontend, worker, base_url = frontend_and_worker
    results, seconds = asyncio.run(Streams(base_url).run(sigterm_then_check(frontend, base_url)))
    assert_all_ended_with_error(results, seconds, 1)
    assert frontend.wait(30) == 0
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0  # nothing in flight any more: the worker drains at once
