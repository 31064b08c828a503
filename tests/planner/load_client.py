"""An open-loop streaming client for planner end-to-end tests: requests at a given rate, each counted by
the client (status, TTFT, tokens received, finish reason), so a failed or cut stream cannot hide."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx


@dataclass
class Outcome:
    sent_at: float
    status: int = 0
    ttft: float = float("inf")
    tokens: int = 0  # completion_tokens of the final usage chunk
    finish_reason: str | None = None
    error: str = ""

    def complete(self, max_tokens: int) -> bool:
        return self.status == 200 and self.tokens == max_tokens and self.finish_reason == "length" and not self.error


async def _one(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, out: Outcome) -> None:
    body = {"model": model, "prompt": "the planner under test", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            out.status = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = str(chunk["error"])
                    continue
                if chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice.get("text") and out.ttft == float("inf"):
                        out.ttft = time.monotonic() - out.sent_at
                    if choice.get("finish_reason"):
                        out.finish_reason = choice["finish_reason"]
    except httpx.HTTPError as e:
        out.error = repr(e)


async def drive(url: str, model: str, phases: list[tuple[float, float]], max_tokens: int) -> list[Outcome]:
    """`phases`: (requests/s, seconds) in order. Returns every request's outcome once all have ended."""
    outcomes: list[Outcome] = []
    tasks: list[asyncio.Task] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=httpx.Limits(max_connections=512)) as client:
        for rate, seconds in phases:
            start = time.monotonic()
            i = 0
            while (due := start + i / rate) < start + seconds:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                o = Outcome(sent_at=time.monotonic())
                outcomes.append(o)
                tasks.append(asyncio.create_task(_one(client, url, model, max_tokens, o)))
                i += 1
        await asyncio.gather(*tasks)
    return outcomes
