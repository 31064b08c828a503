"""Issue 14 (slow lane): the frontend's RSS under 256 concurrent streams. The issue saw 48 -> 73 MB over
4,000 such requests without a plateau. Here 20,000 requests at concurrency 256 after 4,000 of warm-up
(a real `kvrelay serve`, 2 mocker workers, prompts no earlier request used): RSS grows < 10% after the
warm-up, and nothing is left in flight."""

from __future__ import annotations

import argparse
import asyncio

import pytest

import kvrelay.perf.frontend_bench as fb
from tests.e2e.serve import Serve
from tests.e2e.test_frontend_soak import metrics, rss_mb

MODEL = "kvrelay-tiny"
PER_ROUND, WARMUP, ROUNDS, CONCURRENCY = 2000, 2, 10, 256


async def one_round(url: str, r: int) -> None:
    fb._prompt = lambda i, n: [100 + ((i + r * 100_000) * 7 + j * 13 + r) % 1900 for j in range(n)]
    args = argparse.Namespace(requests=PER_ROUND, concurrency=CONCURRENCY, prompt_tokens=64, max_tokens=8)
    await asyncio.wait_for(fb.via_frontend(url, MODEL, args), 300)  # a request that never ends fails here


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_frontend_rss_is_flat_at_concurrency_256(tmp_path, monkeypatch):
    monkeypatch.setattr(fb, "_prompt", fb._prompt)  # one_round swaps it per round; restored after
    # A 1 s speculative-entry TTL: the router's TTL-bounded store then reaches its steady size within the
    # warm-up (with the default 10 s it is still filling after it; test_frontend_soak.py says more).
    srv = Serve(tmp_path, "--engine", "mocker", "--mocker-speedup", "1e9", "--mocker-num-blocks", "4096",
                "--router-speculative-ttl", "1").start()
    try:
        rss = []
        for r in range(WARMUP + ROUNDS):
            asyncio.run(one_round(srv.base_url, r))
            rss.append(rss_mb(srv.proc.pid))
        print(f"\nserve (frontend) RSS per round of {PER_ROUND} at concurrency {CONCURRENCY}, MB: "
              f"{' '.join(f'{x:.1f}' for x in rss)}")
        base = rss[WARMUP - 1]
        assert max(rss[WARMUP:]) < 1.10 * base, rss
        m = metrics(srv.base_url)
        assert m["kvrelay_frontend_inflight_requests"] == 0
        assert m["kvrelay_router_inflight_requests"] == 0
    finally:
        srv.stop()
