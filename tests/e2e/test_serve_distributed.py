"""The same end-to-end check on real etcd + NATS, and migration when a worker dies mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai

from kvrelay.runtime.discovery import DiscoveryConfig
from tests.e2e.serve import Serve, alive, worker_stats
from tests.e2e.test_serve_openai import MODEL, check_openai_clients


def test_openai_clients_on_etcd_and_nats(tmp_path, etcd, nats):
    srv = Serve(tmp_path, "--discovery", "etcd", "--etcd-endpoints", f"127.0.0.1:{etcd.port}",
                "--events", "nats", "--nats-url", f"nats://127.0.0.1:{nats.port}", "--lease-ttl", "3").start()
    try:
        check_openai_clients(srv.base_url)
        deadline = time.monotonic() + 20  # the second worker may register after the first answered
        while (ready := httpx.get(f"{srv.base_url}/ready").json())["workers"] < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready["workers"] == 2
    finally:
        assert srv.stop() == 0


def test_worker_sigkill_mid_stream_migrates(tmp_path):
    srv = Serve(tmp_path, "--lease-ttl", "2", "--migration-limit", "1").start()
    discovery = DiscoveryConfig(discovery="file", discovery_dir=srv.discovery_dir)
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0)
    prompt, n = "The history of the lighthouse keeper begins", 300
    try:
        # Seeded sampling: the engine seeds each draw from (seed, position), so the continuation on the
        # other worker must draw exactly the tokens the dead one would have.
        kw = dict(model=MODEL, prompt=prompt, max_tokens=n, temperature=0.9, seed=1234, extra_body={"ignore_eos": True})
        reference = client.completions.create(**kw).choices[0].text
        stream = client.completions.create(stream=True, **kw)
        texts, killed = [], None
        for chunk in stream:
            texts.append(chunk.choices[0].text)
            if killed is None and len(texts) == 20:
                stats = asyncio.run(worker_stats(discovery, token=srv.internal_token))
                busy = [(pid, wid) for wid, (pid, s) in stats.items() if s.running > 0]
                assert len(busy) == 1, busy
                killed = busy[0]
                os.kill(killed[0], signal.SIGKILL)
                killed_at = time.monotonic()
        assert killed is not None
        # One uninterrupted stream, and sampling continued from the same tokens gives the same text.
        assert "".join(texts) == reference
        assert not alive(killed[0])
        # The dead worker is out of routing: every request after the lease TTL succeeds, none reaches it.
        time.sleep(max(0.0, 2 + 0.5 - (time.monotonic() - killed_at)))
        for i in range(6):
            r = client.completions.create(model=MODEL, prompt=f"after the crash {i}", max_tokens=3)
            assert r.choices[0].finish_reason in ("length", "stop")
        registered = asyncio.run(worker_stats(discovery, token=srv.internal_token))
        assert killed[1] not in registered
    finally:
        srv.stop()
