"""`kvrelay serve --prefill-workers N --decode-workers M`: real processes, the OpenAI API, and the same
completions as aggregated serving — embedded (file + ZMQ) and on real etcd + NATS; a prefill worker
SIGKILLed mid-prefill does not lose the request."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import httpx

from kvrelay.runtime.discovery import DiscoveryConfig, list_instances, make_discovery
from kvrelay.runtime.rpc import RpcClient
from kvrelay.workers.api.endpoints import Endpoint
from kvrelay.workers.api.messages import Empty, EngineStats
from tests.e2e.serve import Serve, alive
from tests.e2e.test_serve_openai import MODEL, check_openai_clients

_rng = random.Random(5)
PROMPTS = [[_rng.randrange(3, 2000) for _ in range(n)] for n in (5, 40, 333, 1200)]


def _complete(base_url: str, prompt, max_tokens: int = 10) -> list:
    r = httpx.post(f"{base_url}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "logprobs": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def _metric(base_url: str, name: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def _wait_all_workers(srv: Serve, count: int = 2, timeout: float = 60.0) -> None:
    """`Serve.start` returns when one worker is up. Wait until the frontend routes to all of them (its
    discovery watch may trail the workers' registration): otherwise a long prompt may be prefilled
    locally only because the frontend did not know of the prefill worker yet."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{srv.base_url}/ready").json().get("workers", 0) < count or \
            "with workers:" not in srv.read_log():
        assert time.monotonic() < deadline, srv.read_log()
        time.sleep(0.05)


def _reference(tmp_path) -> list[list]:
    srv = Serve(tmp_path / "agg", workers=1).start()
    try:
        return [_complete(srv.base_url, p) for p in PROMPTS]
    finally:
        srv.stop()


def _check_disaggregated(srv: Serve, reference: list[list]) -> None:
    check_openai_clients(srv.base_url)
    assert [_complete(srv.base_url, p) for p in PROMPTS] == reference
    # 333 and 1,200 tokens are at or above --disagg-min-tokens 300; the others and the OpenAI client
    # checks' short prompts were prefilled on the decode worker.
    assert _metric(srv.base_url, 'kvrelay_frontend_prefills_total{where="remote"}') == 2


def test_serve_disaggregated_embedded(tmp_path):
    (tmp_path / "agg").mkdir()
    reference = _reference(tmp_path)
    srv = Serve(tmp_path, "--prefill-workers", "1", "--decode-workers", "1", "--disagg-min-tokens", "300",
                workers=None).start()
    try:
        _wait_all_workers(srv)
        assert "with workers: 1 prefill, 1 decode" in srv.read_log()
        _check_disaggregated(srv, reference)
    finally:
        assert srv.stop() == 0


def test_serve_disaggregated_on_etcd_and_nats(tmp_path, etcd, nats):
    (tmp_path / "agg").mkdir()
    reference = _reference(tmp_path)
    srv = Serve(tmp_path, "--prefill-workers", "1", "--decode-workers", "1", "--disagg-min-tokens", "300",
                "--discovery", "etcd", "--etcd-endpoints", f"127.0.0.1:{etcd.port}", "--events", "nats",
                "--nats-url", f"nats://127.0.0.1:{nats.port}", "--lease-ttl", "3", workers=None).start()
    try:
        _wait_all_workers(srv)
        _check_disaggregated(srv, reference)
    finally:
        assert srv.stop() == 0


async def _kill_prefill_worker_when_busy(discovery: DiscoveryConfig, request: threading.Thread) -> int:
    """Start `request`, SIGKILL the prefill worker as soon as it runs it; returns the killed pid."""
    disc = make_discovery(discovery)
    await disc.start()
    client = RpcClient()
    try:
        inst = next(i for i in await list_instances(disc, "default") if i.role == "prefill")
        request.start()
        while request.is_alive():
            stats = await client.unary(inst.address, Endpoint.STATS, Empty(), EngineStats)
            if stats.running:
                pid = int(inst.labels["pid"])
                os.kill(pid, signal.SIGKILL)
                return pid
            await asyncio.sleep(0.002)
        raise AssertionError("the request finished before the prefill worker was seen running it")
    finally:
        await client.close()
        await disc.close()


def test_prefill_worker_sigkilled_mid_prefill_request_completes(tmp_path):
    (tmp_path / "agg").mkdir()
    prompt = [random.Random(9).randrange(3, 2000) for _ in range(3000)]
    # The reference keeps no G3: the prefill worker below must compute the prompt, not load it.
    ref = Serve(tmp_path / "agg", "--kv-disk-dir", "off", workers=1).start()
    try:
        want = _complete(ref.base_url, prompt, 6)
    finally:
        ref.stop()
    # 16-token steps: the 3,000-token prefill takes ~188 steps, a window to kill the worker inside it.
    srv = Serve(tmp_path, "--prefill-workers", "1", "--decode-workers", "1", "--disagg-min-tokens", "64",
                "--max-num-batched-tokens", "16", "--lease-ttl", "2", workers=None).start()
    discovery = DiscoveryConfig(discovery="file", discovery_dir=srv.discovery_dir)
    try:
        _wait_all_workers(srv)
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(tokens=_complete(srv.base_url, prompt, 6)))
        pid = asyncio.run(_kill_prefill_worker_when_busy(discovery, thread))
        thread.join(120)
        assert not thread.is_alive()
        assert result["tokens"] == want
        assert not alive(pid)
        assert _metric(srv.base_url, "kvrelay_frontend_prefill_failovers_total") == 1
    finally:
        srv.stop()
