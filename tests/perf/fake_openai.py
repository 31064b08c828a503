"""A fake OpenAI-compatible SSE server with scripted timings, for checking the bench harness's numbers.

    python -m tests.perf.fake_openai --port PORT [--ttft 0.2] [--itl 0.02]

Each streamed request gets its first content chunk TTFT seconds after it arrived and one chunk per
token every ITL seconds after that, on absolute deadlines (arrival + TTFT + k*ITL), so a late wake-up
is never carried forward. A request may override the script with body fields `fake_ttft`, `fake_itl`
and `fake_cached` (cached_tokens reported; default half the prompt). Usage counts prompt tokens as ids
sent (token prompts) or whitespace words (text prompts, chat messages). GET /debug/requests returns
what was received, with arrival and end times (time.perf_counter, the same clock across processes).

It is plain asyncio HTTP/1.1 (keep-alive, chunked SSE) rather than uvicorn: on a loaded 2-core machine
uvicorn's pure-Python parsing delayed the start of the script's clock by several ms per request in a
burst, which is time the harness rightly measures but the script cannot know.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time

MODEL = "fake-model"
SCRIPT = {"ttft": 0.2, "itl": 0.02}
LOG: list[dict] = []


def _prompt_tokens(body: dict) -> int:
    if "messages" in body:
        return sum(len(m["content"].split()) for m in body["messages"])
    prompt = body["prompt"]
    return len(prompt) if isinstance(prompt, list) else len(prompt.split())


def _chunk(obj: dict | str) -> bytes:
    data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _stream(writer: asyncio.StreamWriter, body: dict, entry: dict, arrival: float) -> None:
    chat = "messages" in body
    n = int(body.get("max_tokens", 16))
    ttft, itl = float(body.get("fake_ttft", SCRIPT["ttft"])), float(body.get("fake_itl", SCRIPT["itl"]))
    prompt = _prompt_tokens(body)
    cached = int(body.get("fake_cached", prompt // 2))
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    if chat:  # like vLLM: a first chunk with the role and no content, which must not count as the first token
        writer.write(_chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None}))
    for k in range(n):
        delay = arrival + ttft + k * itl - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        piece = {"index": 0, "delta": {"content": f" t{k}"}} if chat else {"index": 0, "text": f" t{k}"}
        piece["finish_reason"] = "length" if k == n - 1 else None
        writer.write(_chunk({"object": "chunk", "choices": [piece], "usage": None}))
        await writer.drain()
    usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n,
             "prompt_tokens_details": {"cached_tokens": cached}}
    writer.write(_chunk({"object": "chunk", "choices": [], "usage": usage}) + _chunk("[DONE]") + b"0\r\n\r\n")
    await writer.drain()
    entry["end"] = time.perf_counter()


def _json_response(writer: asyncio.StreamWriter, obj: object, status: str = "200 OK") -> None:
    data = json.dumps(obj).encode()
    writer.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (status.encode(), len(data), data))


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            arrival = time.perf_counter()
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "GET" and path == "/v1/models":
                _json_response(writer, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
            elif method == "GET" and path == "/debug/requests":
                _json_response(writer, LOG)
            elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
                body = json.loads(raw)
                if body.get("model") != MODEL:
                    _json_response(writer, {"error": {"message": "unknown model"}}, "404 Not Found")
                else:
                    entry = {"path": path, "body": body, "arrival": arrival, "end": None}
                    LOG.append(entry)
                    await _stream(writer, body, entry, arrival)
            else:
                _json_response(writer, {"error": "not found"}, "404 Not Found")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    for sock in server.sockets:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ttft", type=float, default=SCRIPT["ttft"])
    ap.add_argument("--itl", type=float, default=SCRIPT["itl"])
    args = ap.parse_args()
    SCRIPT.update(ttft=args.ttft, itl=args.itl)
    try:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
