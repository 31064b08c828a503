"""One streamed OpenAI request, timed: an httpx.AsyncClient reading the SSE stream line by line.

- TTFT: from sending the request to the first chunk with non-empty content (`text` for completions,
  `delta.content` or `delta.reasoning_content` for chat); empty role/keep-alive chunks do not count.
- ITL: the gaps between consecutive content chunks (a chunk carrying several tokens is one gap).
- e2e: from sending to the end of the stream (`data: [DONE]` or the connection closing).
- Token counts and `cached_tokens` come from the final usage chunk (`stream_options.include_usage`);
  a server that sends no usage gets output tokens = content chunks and prompt tokens = ids we sent.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

from kvrelay.perf.bench.tokens import Renderer
from kvrelay.perf.bench.workloads import RequestSpec

_ERROR_BODY_CHARS = 300


class RequestRecord(msgspec.Struct, kw_only=True):
    index: int
    session: int = -1
    turn: int = 0
    start: float  # seconds since the measured start, when the request was sent
    end: float  # seconds since the measured start, when the stream ended
    ttft: float | None = None  # seconds
    itl: list[float] = []  # seconds, one per gap between content chunks
    prompt_len: int  # tokens we synthesised
    prompt_tokens: int  # as the server reports (prompt_len when it does not)
    output_tokens: int
    expected_output_tokens: int
    cached_tokens: int | None = None
    usage_reported: bool = False
    ok: bool = False
    error: str = ""

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _content(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


class BenchClient:
    def __init__(self, url: str, renderer: Renderer, *, api_key: str = "", timeout: float = 600.0,
                 max_connections: int | None = None):
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.http = httpx.AsyncClient(base_url=base_url(url), headers=headers, limits=limits,
                                      timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)))
        self.renderer = renderer
        self._encode = msgspec.json.Encoder().encode
        self._decode = msgspec.json.Decoder().decode

    async def close(self) -> None:
        await self.http.aclose()

    async def send(self, spec: RequestSpec, t0: float) -> RequestRecord:
        """Send one request; never raises for a failed request (the record says ok=False and why)."""
        body = self._encode(self.renderer.body(spec))
        rec = RequestRecord(index=spec.index, session=spec.session, turn=spec.turn, start=0.0, end=0.0,
                            prompt_len=spec.prompt_len(), prompt_tokens=spec.prompt_len(), output_tokens=0,
                            expected_output_tokens=spec.output_len)
        itl: list[float] = []
        chunks = 0
        start = time.perf_counter()
        last = start
        try:
            async with self.http.stream("POST", self.renderer.path, content=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:_ERROR_BODY_CHARS]
                    rec.error = f"HTTP {resp.status_code}: {text}"
                else:
                    done = False
                    async for line in sse_lines(resp):  # read to the end: the connection is then reused
                        if done or not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            done = True
                            continue
                        now = time.perf_counter()
                        chunk = self._decode(data)
                        if chunk.get("error"):
                            rec.error = f"stream error: {str(chunk['error'])[:_ERROR_BODY_CHARS]}"
                            done = True
                            continue
                        if _content(chunk):
                            if chunks == 0:
                                rec.ttft = now - start
                            else:
                                itl.append(now - last)
                            chunks += 1
                            last = now
                        usage = chunk.get("usage")
                        if usage:
                            self._apply_usage(rec, usage)
        except (httpx.HTTPError, msgspec.DecodeError, OSError) as e:
            rec.error = f"{type(e).__name__}: {e}"[:_ERROR_BODY_CHARS]
        end = time.perf_counter()
        rec.start, rec.end, rec.itl = start - t0, end - t0, itl
        if not rec.usage_reported:
            rec.output_tokens = chunks
        if not rec.error and chunks == 0 and spec.output_len > 0:
            rec.error = "no content in the stream"
        rec.ok = not rec.error
        return rec

    @staticmethod
    def _apply_usage(rec: RequestRecord, usage: dict[str, Any]) -> None:
        rec.usage_reported = True
        rec.prompt_tokens = int(usage.get("prompt_tokens") or rec.prompt_tokens)
        rec.output_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            rec.cached_tokens = int(details["cached_tokens"])


async def discover_model(url: str, api_key: str = "", timeout: float = 30.0) -> str:
    """The first model id the endpoint lists at GET /v1/models."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url(url), headers=headers, timeout=timeout) as http:
        resp = await http.get("/v1/models")
        resp.raise_for_status()
        models = resp.json().get("data") or []
    if not models:
        raise RuntimeError(f"{url} lists no models at /v1/models; pass --model")
    return str(models[0]["id"])


async def sse_lines(resp: httpx.Response) -> AsyncIterator[str]:
    """The lines of an event stream, split where the SSE format ends a line (LF, CRLF) and nowhere else:
    httpx's `aiter_lines` also splits at U+2028, U+0085 and the like (Python's `splitlines`), which JSON
    carries raw inside strings, so a generated one cut a `data:` line in two (a DecodeError)."""
    buffer = b""
    async for piece in resp.aiter_bytes():
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode(errors="replace")
    if buffer:
        yield buffer.rstrip(b"\r").decode(errors="replace")
