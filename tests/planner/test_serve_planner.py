"""`kvrelay serve --planner load` end to end with mocker workers: a 4x load step adds decode workers
within 3 intervals and the client's TTFT p90 comes back under target; when the load drops, workers
are removed and not one request fails or is cut (counted by the client); no oscillation at steady load.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.e2e.serve import Serve
from tests.planner.load_client import drive

INTERVAL = 2.0
TTFT_TARGET = 1.0
MAX_TOKENS = 48  # ~1.2 s a stream: scale-down meets streams in flight


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[int(0.9 * (len(xs) - 1))]


async def _watch(url: str, samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        while not stop.is_set():
            try:
                s = (await client.get(f"{url}/status")).json()
                samples.append((time.monotonic(), s["ready"]["decode"]))
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)


@pytest.mark.slow  # ~75 s of load steps: the slow lane keeps the default suite under its 20 minutes
async def test_load_step_scales_decode_up_then_down_without_a_failed_request(tmp_path):
    # one mocker worker: 4 sequences at once, ~25 ms a step -> ~1.2 s a request, ~3.3 requests/s
    serve = Serve(tmp_path, "--engine", "mocker", "--planner", "load", "--planner-interval", str(INTERVAL),
                  "--max-prefill", "0", "--min-decode", "1", "--max-decode", "4", "--budget", "4",
                  "--max-num-seqs", "4", "--mocker-decode-base-ms", "25", "--ttft-target", str(TTFT_TARGET),
                  "--itl-target", "0.5", workers=1).start()
    try:
        planner_url = None
        for _ in range(100):
            m = re.search(r"PLANNER (\S+)", serve.read_log())
            if m:
                planner_url = m.group(1)
                break
            await asyncio.sleep(0.1)
        assert planner_url, serve.read_log()
        samples: list[tuple[float, int]] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch(planner_url, samples, stop))
        t0 = time.monotonic()
        phases = [(1.0, 12.0), (4.0, 30.0), (1.0, 30.0)]  # low, 4x, low again
        outcomes = await drive(serve.base_url, "kvrelay-tiny", phases, MAX_TOKENS)
        stop.set()
        await watcher
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"{serve.base_url}/metrics")).text
    finally:
        serve.stop()
    step_at, drop_at = t0 + 12.0, t0 + 42.0
    # scale-up: more than one decode worker within 3 intervals of the step (+ a worker's start)
    up = [t for t, n in samples if n > 1 and t >= step_at]
    assert up and up[0] - step_at <= 3 * INTERVAL + 3.0, (samples, serve.read_log())
    # TTFT p90 back under target in the last third of the high phase
    late = [o.ttft for o in outcomes if drop_at - 10 <= o.sent_at < drop_at]
    assert _p90(late) <= TTFT_TARGET, _p90(late)
    # scale-down after the drop, and the client saw every request complete, none cut
    peak = max(n for t, n in samples if t < drop_at + 2)
    end = [n for t, n in samples if t > drop_at + 20]
    assert end and min(end) < peak, samples
    bad = [o for o in outcomes if not o.complete(MAX_TOKENS)]
    assert not bad, bad[:5]
    # streams of a stopped worker that did not drain in time continue elsewhere; report how many did
    print("frontend migrations:", [ln for ln in metrics.splitlines() if "migration" in ln and not ln.startswith("#")])
    # no oscillation: at most one change of direction in any 10 intervals of the decode count
    counts = [n for _, n in samples]
    moves = [b - a for a, b in zip(counts, counts[1:], strict=False) if b != a]
    flips = sum(1 for a, b in zip(moves, moves[1:], strict=False) if (a > 0) != (b > 0))
    assert flips <= 2, counts  # one up-run and one down-run over the whole test (at most one wobble)
