"""`kvrelay planner profile --url`: measures a running deployment's curves through its OpenAI API
(any engine behind it: native, mocker, vLLM), the same curves `profile_from_cost` derives from a
timing model.

- TTFT vs input length: sequential streamed requests with `max_tokens=1` and fresh random token ids
  (nothing cached), median of `repeats`.
- ITL vs concurrency and context: `c` streams of `context`-token prompts decoding `decode_tokens` each
  at once; a stream's ITL is (last token - first token) / (tokens - 1), the curve point the median.
  Points are made non-decreasing in concurrency (noise must not tell the policy that more sequences
  are faster; the sla policy's search relies on it).
Profile a deployment of one worker per pool: the curves are per worker.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

import httpx

from kvrelay.planner.profile import Profile


async def _stream(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int
                  ) -> tuple[float, float, int]:
    """(time to first token, time of the last token, tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = time.monotonic()
    first = last = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"profile request failed: HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                last = time.monotonic()
                first = first or last
    if first is None or last is None:
        raise RuntimeError("profile request streamed no tokens")
    return first - start, last - start, tokens


async def measure_profile(url: str, model: str, isls: tuple[int, ...] = (128, 512, 1024, 2048),
                          concurrencies: tuple[int, ...] = (1, 4, 8, 16), contexts: tuple[int, ...] = (256, 1024),
                          decode_tokens: int = 32, repeats: int = 3, seed: int = 0) -> Profile:
    rnd = random.Random(seed)

    def prompt(n: int) -> list[int]:
        return [rnd.randrange(10, 200) for _ in range(n)]

    url = url.rstrip("/")
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        ttfts = []
        for isl in isls:
            samples = [(await _stream(client, url, model, prompt(isl), 1))[0] for _ in range(repeats)]
            ttfts.append(statistics.median(samples))
        itl_rows = []
        for ctx in contexts:
            row: list[float] = []
            for c in concurrencies:
                results = await asyncio.gather(*(_stream(client, url, model, prompt(ctx), decode_tokens)
                                                 for _ in range(c)))
                itls = [(last - first) / (n - 1) for first, last, n in results if n > 1]
                point = statistics.median(itls) if itls else 0.0
                row.append(max(point, row[-1]) if row else point)
            itl_rows.append(row)
    return Profile(prefill_isl=[float(i) for i in isls], prefill_ttft_s=ttfts,
                   decode_concurrency=[float(c) for c in concurrencies], decode_context=[float(x) for x in contexts],
                   decode_itl_s=itl_rows)
