"""Several frontends in front of the same workers (Kubernetes replicas, issue 18): two `kvrelay frontend`
processes on real etcd + NATS, four mocker workers. Each frontend builds its KV index from the workers'
events and counts the other's in-flight requests (frontend/peer_load.py), so
- a multi-turn workload whose turns alternate between the frontends (a Service balancing connections)
  keeps >= 0.95x the prefix hit rate of one frontend, and
- a burst of single-turn prompts split between them spreads over the workers (max/mean <= 1.5)
  instead of herding onto the same idle worker from both sides.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import subprocess
import sys
import time

import httpx
import pytest

from kvrelay.perf.serve_process import free_port
from kvrelay.runtime.discovery import DiscoveryConfig
from kvrelay.workers.models.registry import resolve_model
from tests.e2e.serve import worker_stats

MODEL = "kvrelay-tiny"
USERS, TURNS, SYSTEM, TURN = 24, 5, 200, 40


class Cluster:
    def __init__(self, tmp, etcd, nats):
        self.token = secrets.token_urlsafe(16)
        self.env = {**os.environ, "KVRELAY_INTERNAL_TOKEN": self.token}
        self.planes = ["--discovery", "etcd", "--etcd-endpoints", f"127.0.0.1:{etcd.port}", "--events", "nats",
                       "--nats-url", f"nats://127.0.0.1:{nats.port}", "--lease-ttl", "3"]
        self.discovery = DiscoveryConfig(discovery="etcd", etcd_endpoints=f"127.0.0.1:{etcd.port}")
        self.tmp, self.procs, self.urls = tmp, [], []
        model = str(resolve_model("tiny").path)
        for _ in range(4):
            self._spawn("worker", "--engine", "mocker", "--model", model, "--served-model-name", MODEL,
                        "--mocker-speedup", "20", "--metrics-port", "-1")
        deadline = time.monotonic() + 90
        while len(asyncio.run(worker_stats(self.discovery, token=self.token))) < 4:
            assert time.monotonic() < deadline, "workers did not register"
            time.sleep(0.2)

    def _spawn(self, *argv: str) -> None:
        log = open(self.tmp / f"{argv[0]}-{len(self.procs)}.log", "w")  # noqa: SIM115 - lives with the process
        self.procs.append(subprocess.Popen([sys.executable, "-m", "kvrelay.cli.main", *argv, *self.planes],
                                           stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def frontend(self) -> str:
        port = free_port()
        self._spawn("frontend", "--http-port", str(port), "--http-workers", "1")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=1).json().get("workers") == 4:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline, "frontend not ready"
            time.sleep(0.2)
        self.urls.append(url)
        return url

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def cluster(tmp_path, etcd, nats):
    c = Cluster(tmp_path, etcd, nats)
    yield c
    c.stop()


async def multi_turn(urls: list[str], seed: int) -> float:
    """Prefix hit rate of USERS conversations (shared system prompt); turn t of user u goes to frontend
    (u + t) % len(urls). Users run concurrently, turns in order."""
    rng = random.Random(seed)
    system = [rng.randrange(10, 500) for _ in range(SYSTEM)]
    totals = {"prompt": 0, "cached": 0}

    async def user(client: httpx.AsyncClient, u: int) -> None:
        history = list(system)
        for t in range(TURNS):
            history += [rng.randrange(10, 500) for _ in range(TURN)]
            r = await client.post(f"{urls[(u + t) % len(urls)]}/v1/completions", json={
                "model": MODEL, "prompt": history, "max_tokens": 8, "ignore_eos": True})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            if t:  # the first turn has only the system prompt to share
                totals["prompt"] += usage["prompt_tokens"]
                totals["cached"] += usage["prompt_tokens_details"]["cached_tokens"]

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(user(client, u) for u in range(USERS)))
    return totals["cached"] / totals["prompt"]


def test_two_frontends_keep_the_hit_rate_and_spread_the_load(cluster):
    one = cluster.frontend()
    single = asyncio.run(multi_turn([one], seed=1))
    two = [one, cluster.frontend()]
    pair = asyncio.run(multi_turn(two, seed=2))  # new conversations: nothing cached from the first run
    print(f"\nmulti-turn prefix hit rate: one frontend {single:.3f}, two {pair:.3f} ({pair / single:.3f}x)")
    assert pair >= 0.95 * single

    before = {w: s.prompt_tokens for w, (_, s) in asyncio.run(worker_stats(cluster.discovery, token=cluster.token)).items()}

    async def burst() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*(client.post(f"{two[i % 2]}/v1/completions", json={
                "model": MODEL, "prompt": [1000 + i] * 64, "max_tokens": 64, "ignore_eos": True})
                for i in range(32)))

    asyncio.run(burst())
    after = asyncio.run(worker_stats(cluster.discovery, token=cluster.token))
    per_worker = [(s.prompt_tokens - before[w]) // 64 for w, (_, s) in after.items()]
    spread = max(per_worker) / (sum(per_worker) / len(per_worker))
    print(f"single-turn requests per worker: {sorted(per_worker)} (spread {spread:.2f})")
    assert sum(per_worker) == 32 and spread <= 1.5
