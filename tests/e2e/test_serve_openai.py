"""`kvrelay serve` end to end with the official `openai` client (the main job a user runs)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import httpx
import openai
import pytest

from kvrelay.runtime.discovery import DiscoveryConfig
from tests.e2e.serve import Serve, alive, wait_idle

MODEL = "kvrelay-tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    srv = Serve(tmp_path_factory.mktemp("serve"), "--lease-ttl", "3").start()
    yield srv
    srv.stop()


def check_openai_clients(base_url: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens >= 1
    comp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 8
    # streaming must carry exactly the same text as the non-streamed greedy answer
    pieces = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(pieces)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == comp.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                            max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content

    async def async_client() -> None:
        aclient = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        replies = await asyncio.gather(*(aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Question {i}"}], max_tokens=6) for i in range(8)))
        assert all(r.choices[0].message.content is not None for r in replies)
        stream = await aclient.chat.completions.create(model=MODEL, max_tokens=6, stream=True,
                                                       messages=[{"role": "user", "content": "Stream please"}])
        assert [c async for c in stream]

    asyncio.run(async_client())


def test_openai_client_sync_async_streaming(served):
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)
    client.completions.create(model=MODEL, prompt="first", max_tokens=1)
    elapsed = time.monotonic() - served.started_at
    print(f"first request answered {elapsed:.1f}s after launch")
    assert elapsed < 20
    check_openai_clients(served.base_url)


def test_prefix_cache_hit_is_reported(served):
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)
    # Unique text: blocks outlive processes (G3), so a prompt an earlier test sent would already be cached.
    long = f"Session {uuid.uuid4().hex}. " + "You are a careful assistant. " * 20
    first = client.completions.create(model=MODEL, prompt=long, max_tokens=4)
    time.sleep(0.5)  # the worker's KV events reach the router's index asynchronously (ZMQ)
    again = client.completions.create(model=MODEL, prompt=long, max_tokens=4)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16
    assert again.choices[0].text == first.choices[0].text or again.choices[0].finish_reason


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", b'{"model": "kvrelay-tiny", "messages": "hi"}', 400, "messages"),
        ("/v1/chat/completions", b'{"model": "kvrelay-tiny", "messages": [{"role": "user", "content": "x"}],'
                                 b' "max_tokens": -5}', 400, "max_tokens"),
        ("/v1/completions", b'{"model": "kvrelay-tiny", "prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
        ("/v1/completions", b'{"model": "no-such-model", "prompt": "x"}', 404, "model"),
        ("/v1/completions", b'{"model": "kvrelay-tiny", "prompt": "' + b"word " * 6000 + b'"}', 400, "prompt"),
        ("/v1/completions", b'{"model": "kvrelay-tiny", "prompt": [999999]}', 400, "prompt"),
        ("/v1/nothing", b"{}", 404, None),
        # sampling fields (issue 28): each has its effect (test_sampling_fields) or is a 400 naming it
        ("/v1/completions", b'{"model": "kvrelay-tiny", "prompt": "x", "logit_bias": {"5000": 1}}', 400, "logit_bias"),
        ("/v1/completions", b'{"model": "kvrelay-tiny", "prompt": "x", "logit_bias": {"a": 1}}', 400, "logit_bias"),
        ("/v1/completions", b'{"model": "kvrelay-tiny", "prompt": "x", "frequency_penalty": 3}', 400,
         "frequency_penalty"),
        ("/v1/completions", b'{"model": "kvrelay-tiny", "prompt": "x", "presence_penalty": -2.5}', 400,
         "presence_penalty"),
        ("/v1/completions", b'{"model": "kvrelay-tiny", "prompt": "x", "repetition_penalty": 0}', 400,
         "repetition_penalty"),
        ("/v1/completions", b'{"model": "kvrelay-tiny", "prompt": "x", "min_p": 1.5}', 400, "min_p"),
        ("/v1/completions", b'{"model": "kvrelay-tiny", "prompt": "x", "logprobs": 21}', 400, "logprobs"),
        ("/v1/completions", b'{"model": "kvrelay-tiny", "prompt": "x", "max_tokens": 4, "min_tokens": 5}', 400,
         "min_tokens"),
        ("/v1/chat/completions", b'{"model": "kvrelay-tiny", "messages": [{"role": "user", "content": "x"}],'
                                 b' "logprobs": true, "top_logprobs": 21}', 400, "top_logprobs"),
    ],
)
def test_bad_requests_get_openai_errors_and_server_keeps_serving(served, path, body, status, param):
    r = httpx.post(served.base_url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    ok = httpx.post(f"{served.base_url}/v1/completions", json={"model": MODEL, "prompt": "still there?",
                                                                "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_api_key(tmp_path):
    srv = Serve(tmp_path, "--api-key", "s3cret", workers=1).start()
    try:
        url = f"{srv.base_url}/v1/completions"
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        assert httpx.post(url, json=body, headers={"authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(url, json=body).status_code == 401
        assert httpx.post(url, json=body, headers={"authorization": "Bearer s3cret"}).status_code == 200
    finally:
        srv.stop()


def test_200_cancelled_streams_free_every_block(served):
    discovery = DiscoveryConfig(discovery="file", discovery_dir=served.discovery_dir)
    before = asyncio.run(wait_idle(discovery, token=served.internal_token))

    async def cancel_one(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": MODEL, "prompt": f"request {i} " * 30, "max_tokens": 500, "stream": True,
                "ignore_eos": True}
        async with client.stream("POST", f"{served.base_url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for _ in r.aiter_lines():
                break  # leave after the first chunk: the connection closes mid-stream

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=20)) as client:
            sem = asyncio.Semaphore(20)

            async def guarded(i: int) -> None:
                async with sem:
                    await cancel_one(client, i)

            await asyncio.gather(*(guarded(i) for i in range(200)))

    asyncio.run(run())
    after = asyncio.run(wait_idle(discovery, token=served.internal_token))
    for wid, (_, stats) in after.items():
        _, start = before[wid]
        assert stats.running == stats.waiting == 0, (wid, stats)
        assert stats.free_blocks == start.free_blocks == stats.total_blocks, (wid, start, stats)


def test_interrupt_leaves_no_process(tmp_path):
    srv = Serve(tmp_path, workers=2).start()
    children = srv.children()
    assert len(children) == 2
    assert srv.stop(signal.SIGINT) == 0
    deadline = time.monotonic() + 10
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in children)


def test_an_idle_keep_alive_connection_outlives_the_clients_pool_expiry(served):
    """A connection idle for longer than httpx's keep-alive expiry (5 s, uvicorn's default too) is still
    open: a client reusing it at that moment must not race the server's close (a ReadError otherwise)."""
    import socket

    host, port = served.base_url.removeprefix("http://").split(":")
    request = f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock, sock.makefile("rb") as f:
        for pause in (0, 6):
            time.sleep(pause)
            sock.sendall(request)
            status = f.readline()
            assert status.startswith(b"HTTP/1.1 200"), status  # b"" if the server had closed it
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert b"kvrelay-tiny" in f.read(length)


def test_sampling_fields(served):
    """top_logprobs, logit_bias and min_tokens through the HTTP API (the engine-side semantics are
    tested token for token in tests/workers/test_sampling_params.py)."""
    from tokenizers import Tokenizer

    from kvrelay.workers.models.tiny import ensure_tiny_model

    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "Tell me about the ledger"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=5, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 8
    for c in content:  # greedy: the chosen token is the most likely one
        assert len(c.top_logprobs) == 5 and c.top_logprobs[0].bytes == c.bytes
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=5, stream=True, extra_body={"ignore_eos": True})
    streamed = [e for ch in stream if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, [t.token for t in e.top_logprobs]) for e in streamed] == [
        (e.token, [t.token for t in e.top_logprobs]) for e in content]

    comp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0.8, seed=3,
                                     logprobs=3, extra_body={"ignore_eos": True})
    lp = comp.choices[0].logprobs
    assert all(tok in top and 3 <= len(top) <= 4 for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True))

    word = Tokenizer.from_file(str(ensure_tiny_model() / "tokenizer.json")).encode(" ledger", add_special_tokens=False)
    forced = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=1.0,
                                       logit_bias={str(word.ids[0]): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == word.tokens[0].replace("\u0120", " ") * 4

    plain = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    first = plain.choices[0].text[:2]
    held = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stop=[first],
                                     extra_body={"ignore_eos": True, "min_tokens": 6})
    assert held.choices[0].text == plain.choices[0].text  # the stop string is held back by min_tokens
    cut = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stop=[first],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == ""  # without min_tokens it stops at once
