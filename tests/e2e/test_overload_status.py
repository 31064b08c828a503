"""Issue 29, "status before streaming": a request the server refuses (every worker's waiting queue full)
gets its own status, 429 with `Retry-After` and OpenAI's error JSON, before any body byte, streamed or
not; never a 200 with an error event inside. `kvrelay_frontend_requests_total` counts each request under
the status its client saw."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter

import httpx

from tests.e2e.serve import Serve

MODEL = "kvrelay-tiny"
STREAMED, WHOLE = 64, 32
# One mocker worker running 4 sequences with 4 more waiting: of 96 simultaneous 100-token requests
# (~0.5 s each) 4 to 8 are admitted at a time; the rest must be refused at once.
ARGS = ("--engine", "mocker", "--max-num-seqs", "4", "--max-waiting", "4")


async def _one(client: httpx.AsyncClient, base: str, i: int, stream: bool) -> tuple[int, str | None]:
    """(status, why it failed) for one request; `why` is None for a complete, error-free answer."""
    body = {"model": MODEL, "prompt": f"overload {i}", "max_tokens": 100, "ignore_eos": True, "stream": stream}
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        raw = await r.aread()
        if r.status_code != 200:
            err = json.loads(raw)["error"]
            assert err["code"] and err["message"], raw
            assert r.headers.get("retry-after", "").isdigit(), (r.status_code, dict(r.headers))
            assert r.headers["content-type"].startswith("application/json")
            return r.status_code, err["code"]
        if not stream:
            assert json.loads(raw)["usage"]["completion_tokens"] == 100
            return 200, None
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        errors = [e for e in events[:-1] if "error" in json.loads(e)]
        assert not errors, f"an error inside a 200: {errors}"
        return 200, None


def _requests_total(metrics: str) -> dict[str, float]:
    pattern = r'^kvrelay_frontend_requests_total\{endpoint="completions",status="(\d+)"\} (\S+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, metrics, re.M)}


def test_refusals_are_statuses_with_retry_after(tmp_path):
    srv = Serve(tmp_path, *ARGS, workers=1).start()
    try:
        async def run() -> list[tuple[int, str | None]]:
            limits = httpx.Limits(max_connections=STREAMED + WHOLE)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                return await asyncio.gather(*[_one(client, srv.base_url, i, stream=i < STREAMED)
                                              for i in range(STREAMED + WHOLE)])

        results = asyncio.run(run())
        seen = Counter(status for status, _ in results)
        assert seen[200] >= 4, seen  # the admitted ones completed (a burst fills the 4 waiting places first)
        assert seen[429] >= STREAMED // 2, seen  # most were refused, as statuses
        assert set(seen) <= {200, 429}, seen
        assert {why for status, why in results if status == 429} == {"server_busy"}
        streamed_refused = sum(1 for i, (status, _) in enumerate(results) if i < STREAMED and status == 429)
        assert streamed_refused > 0, results
        metrics = httpx.get(f"{srv.base_url}/metrics").text
        assert _requests_total(metrics) == {str(s): float(n) for s, n in seen.items()}, metrics
    finally:
        srv.stop()


def test_a_stream_failing_after_its_200_has_a_code_and_is_counted_as_failed(tmp_path):
    """An error after the first byte can only be an SSE event: it carries a non-null `code`, and the
    request is counted under the error's status, not the 200 that was already sent."""
    import os
    import signal

    srv = Serve(tmp_path, "--engine", "mocker", "--migration-limit", "0", "--worker-wait", "0", workers=1).start()
    try:
        (worker,) = srv.children()
        body = {"model": MODEL, "prompt": "cut", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", f"{srv.base_url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        os.kill(worker, signal.SIGKILL)  # mid-stream, with nowhere to migrate
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "worker_failed", error
        metrics = httpx.get(f"{srv.base_url}/metrics").text
        assert _requests_total(metrics) == {"503": 1.0}, metrics
    finally:
        srv.stop()
