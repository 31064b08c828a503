"""A lean streamed-chat load generator (issue 19): `concurrency` keep-alive HTTP/1.1 connections, each
sending one streamed `/v1/chat/completions` at a time and reading its SSE stream.

It measures what aiperf measures, the same way: TTFT = first SSE event carrying content, ITL =
(end-to-end - TTFT) / (output tokens - 1), output tokens from the final usage chunk
(`stream_options.include_usage`). It costs little CPU per token (it scans bytes, it parses only the
usage chunk), so on a shared 2-core machine the server, not the client, is what gets measured.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

_USAGE = b'"completion_tokens":'


@dataclass
class ChatResult:
    requests_per_s: float
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: int = 0

    def summary(self) -> dict:
        return {"requests_per_s": self.requests_per_s, "ttft_p50_ms": _pct(self.ttft_ms, 50),
                "ttft_p99_ms": _pct(self.ttft_ms, 99), "itl_p50_ms": _pct(self.itl_ms, 50),
                "itl_p99_ms": _pct(self.itl_ms, 99), "output_tokens": self.output_tokens, "errors": self.errors}


def _pct(xs: list[float], q: int) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def chat_prompts(tokenizer_dir: str, n: int, tokens: int, seed: int = 0) -> list[str]:
    """`n` distinct user messages of about `tokens` tokens each (words that encode to one token)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(f"{tokenizer_dir}/tokenizer.json")
    vocab = [w for w, i in tok.get_vocab().items() if w.startswith("Ġ") and w[1:].isalpha() and len(w) > 3]
    words = sorted(w[1:] for w in vocab if len(tok.encode(" " + w[1:], add_special_tokens=False).ids) == 1)
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(tokens)) for _ in range(n)]


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.first: float | None = None
        self.done: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.first is None and b'"content":"' in data.replace(b'"content":""', b""):
            self.first = time.perf_counter()
        self.buf += data
        if b"data: [DONE]" in data and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection lost"))

    async def request(self, raw: bytes) -> tuple[float, float, int]:
        """(TTFT s, end-to-end s, output tokens) of one streamed request."""
        self.buf.clear()
        self.first = None
        self.done = asyncio.get_running_loop().create_future()
        t = time.perf_counter()
        assert self.transport is not None  # create_connection made it
        self.transport.write(raw)
        await self.done
        end = time.perf_counter()
        i = self.buf.rfind(_USAGE)
        n = int(self.buf[i + len(_USAGE):].split(b",", 1)[0]) if i >= 0 else 0
        return (self.first or end) - t, end - t, n


async def run_chat(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int,
                   requests: int) -> ChatResult:
    host, port = url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    conns = [(await loop.create_connection(_Conn, host, int(port)))[1] for _ in range(concurrency)]
    out = ChatResult(0.0)
    todo = iter(range(requests))

    async def worker(conn: _Conn) -> None:
        for i in todo:
            body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                               "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                               "stream_options": {"include_usage": True}}).encode()
            raw = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            try:
                ttft, e2e, n = await conn.request(raw)
            except ConnectionError:
                out.errors += 1
                return
            out.ttft_ms.append(ttft * 1000)
            out.output_tokens += n
            if n > 1:
                out.itl_ms.append((e2e - ttft) / (n - 1) * 1000)

    t = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for c in conns:
            if c.transport is not None:
                c.transport.close()
    out.requests_per_s = len(out.ttft_ms) / (time.perf_counter() - t)
    return out
