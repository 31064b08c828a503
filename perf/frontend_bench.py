"""Frontend + router overhead (issue #4): the same load through `kvrelay serve` vs straight to a worker.

    python -m kvrelay.perf.frontend_bench [--requests 2000] [--concurrency 16] [--workers 1]

`--setting chat` is the streamed-chat setting instead (issue 19; perf/frontend_chat_bench.py:
256-token prompts, 64 output tokens, kvrelay with 1..N HTTP processes vs Dynamo, optionally with
aiperf as the load generator). What follows describes the default `--setting completions`.

`kvrelay serve --engine mocker` with an effectively infinite speedup, so the engine returns at once
and what is measured is the path in front of it. Both loads run interleaved in one run from this
process (which also costs CPU on the same 2 cores):
- frontend: streamed `/v1/completions` over HTTP (a lean keep-alive client, `concurrency`
  connections), prompt as token ids, `max_tokens` tokens, `ignore_eos`; TTFT = first chunk with text.
- direct: the same `EngineRequest`s to one worker's `generate` endpoint over the request plane.
- dynamo (with `--dynamo-python PY`): the same HTTP load against NVIDIA Dynamo's frontend serving its
  mocker (`--speedup-ratio 1e9`) on file discovery, TCP request plane, ZMQ events, kv router; started
  from that interpreter (see perf/dynamo_process.py), interleaved with the two above.
Reported: requests/s and TTFT p50/p99 for each, the ratio frontend / direct and, with Dynamo, the ratio
of our frontend's request rate to Dynamo's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from kvrelay.perf.serve_process import Serve
from kvrelay.runtime.discovery import DiscoveryConfig, list_instances, make_discovery
from kvrelay.runtime.rpc import RpcClient
from kvrelay.workers.api.client import WorkerClient
from kvrelay.workers.api.messages import EngineRequest, SamplingParams


def _pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] * 1000


async def _pool(n: int, concurrency: int, one) -> tuple[float, list[float]]:
    ttfts: list[float] = []
    queue = iter(range(n))

    async def worker() -> None:
        for i in queue:
            ttfts.append(await one(i))

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t), ttfts


def _prompt(i: int, length: int) -> list[int]:
    return [100 + (i * 7 + j) % 1500 for j in range(length)]


class _SseConnection(asyncio.Protocol):
    """A lean keep-alive HTTP/1.1 client for one streamed request at a time: the load generator must
    cost about what the request-plane client costs, or it, not the frontend, is what gets measured.
    It looks only for the first chunk carrying text (TTFT) and the terminating `[DONE]`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.first: asyncio.Future | None = None
        self.done: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.first is not None and not self.first.done() and b'"text":"' in data.replace(b'"text":""', b""):
            self.first.set_result(time.perf_counter())
        if b"data: [DONE]" in data and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc) -> None:
        for fut in (self.first, self.done):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError("connection lost"))

    async def request(self, raw: bytes) -> float:
        loop = asyncio.get_running_loop()
        self.first, self.done = loop.create_future(), loop.create_future()
        t = time.perf_counter()
        assert self.transport is not None  # create_connection made it
        self.transport.write(raw)
        await self.done
        return (self.first.result() if self.first.done() else time.perf_counter()) - t


async def via_frontend(url: str, model: str, args: argparse.Namespace) -> tuple[float, list[float]]:
    host, port = url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    conns = [(await loop.create_connection(_SseConnection, host, int(port)))[1] for _ in range(args.concurrency)]
    free: asyncio.Queue[_SseConnection] = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)

    async def one(i: int) -> float:
        body = json.dumps({"model": model, "prompt": _prompt(i, args.prompt_tokens), "max_tokens": args.max_tokens,
                           "stream": True, "ignore_eos": True}).encode()
        raw = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        conn = await free.get()
        try:
            return await conn.request(raw)
        finally:
            free.put_nowait(conn)

    try:
        return await _pool(args.requests, args.concurrency, one)
    finally:
        for c in conns:
            if c.transport is not None:
                c.transport.close()


async def direct(address: str, args: argparse.Namespace, token: str = "") -> tuple[float, list[float]]:
    client = WorkerClient(RpcClient(token=token))

    async def one(i: int) -> float:
        req = EngineRequest(request_id=f"direct-{i}-{time.monotonic_ns()}", prompt_token_ids=_prompt(i, args.prompt_tokens),
                            sampling=SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
        t = time.perf_counter()
        ttft = None
        async for _ in client.generate(address, req):
            if ttft is None:
                ttft = time.perf_counter() - t
        assert ttft is not None, "no output"  # ignore_eos, max_tokens >= 1: at least one token
        return ttft

    try:
        return await _pool(args.requests, args.concurrency, one)
    finally:
        await client.close()


async def measure(url: str, discovery_dir: str, args: argparse.Namespace, dynamo_url: str | None = None,
                  token: str = "") -> dict:
    disc = make_discovery(DiscoveryConfig(discovery="file", discovery_dir=discovery_dir))
    await disc.start()
    address = (await list_instances(disc, "default"))[0].address
    await disc.close()
    small = argparse.Namespace(**{**vars(args), "requests": 100})
    await via_frontend(url, "kvrelay-tiny", small)  # warm-up
    await direct(address, small, token)
    if dynamo_url:
        await via_frontend(dynamo_url, "kvrelay-tiny", small)
    rows: dict[str, list] = {"frontend": [], "direct": [], **({"dynamo": []} if dynamo_url else {})}
    for _ in range(args.repeats):
        rows["frontend"].append(await via_frontend(url, "kvrelay-tiny", args))
        rows["direct"].append(await direct(address, args, token))
        if dynamo_url:
            rows["dynamo"].append(await via_frontend(dynamo_url, "kvrelay-tiny", args))
    out = {}
    for name, runs in rows.items():
        ttfts = [t for _, ts in runs for t in ts]
        out[name] = {"requests_per_s": statistics.median(r for r, _ in runs),
                     "ttft_p50_ms": _pct(ttfts, 50), "ttft_p99_ms": _pct(ttfts, 99)}
    out["ratio_requests_per_s"] = out["frontend"]["requests_per_s"] / out["direct"]["requests_per_s"]
    out["added_ttft_p50_ms"] = out["frontend"]["ttft_p50_ms"] - out["direct"]["ttft_p50_ms"]
    if dynamo_url:
        out["ratio_requests_per_s_vs_dynamo"] = out["frontend"]["requests_per_s"] / out["dynamo"]["requests_per_s"]
        out["dynamo_ratio_to_our_direct"] = out["dynamo"]["requests_per_s"] / out["direct"]["requests_per_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrelay.perf.frontend_bench")
    p.add_argument("--setting", choices=("completions", "chat"), default="completions",
                   help="completions: overhead vs direct (issue 4); chat: streamed chat vs Dynamo (issue 19)")
    p.add_argument("--requests", type=int, default=None, help="per run (default 2000; chat: 500)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 128; chat: 256")
    p.add_argument("--max-tokens", type=int, default=None, help="default 16; chat: 64")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--dynamo-python", default=None,
                   help="interpreter with ai-dynamo installed: also measure Dynamo's frontend + mocker")
    from kvrelay.perf import frontend_chat_bench

    frontend_chat_bench.add_arguments(p)
    args = p.parse_args(argv)
    chat = args.setting == "chat"
    for name, default, chat_default in (("requests", 2000, 500), ("prompt_tokens", 128, 256), ("max_tokens", 16, 64)):
        if getattr(args, name) is None:
            setattr(args, name, chat_default if chat else default)
    if chat:
        result = frontend_chat_bench.run(args)
        result["config"] = vars(args)
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        srv = Serve(Path(tmp), "--engine", "mocker", "--mocker-speedup", "1e9", "--router-mode", "kv",
                    workers=args.workers).start()
        dyn = None
        try:
            if args.dynamo_python:
                from kvrelay.perf.dynamo_process import DynamoServe
                from kvrelay.workers.models.tiny import ensure_tiny_model

                dyn = DynamoServe(args.dynamo_python, Path(tmp), str(ensure_tiny_model()), "kvrelay-tiny").start()
            result = asyncio.run(measure(srv.base_url, srv.discovery_dir, args, dyn.base_url if dyn else None,
                                         srv.internal_token))
        finally:
            srv.stop()
            if dyn is not None:
                dyn.stop()
    result["config"] = vars(args)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
