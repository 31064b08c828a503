"""`kvrelay serve --engine vllm` with two vLLM workers behind the kv router, against the official
`openai` client, vLLM's own OpenAI server and kvrelay's native engine (issue 15's acceptance)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time

import openai
import pytest

from kvrelay.perf.serve_process import Serve
from kvrelay.runtime.discovery import DiscoveryConfig
from tests.e2e.serve import alive, wait_idle, worker_stats
from tests.e2e.test_serve_disagg import _metric
from tests.models.smollm2 import model_dir
from tests.vllm.conftest import MODEL, VllmServer, vllm_serve

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three primary colors.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Give me a name for a pet turtle.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    srv = vllm_serve(tmp_path_factory.mktemp("vllm-serve"), workers=2)
    yield srv
    srv.stop()


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=120)


def greedy(c: openai.OpenAI) -> list[tuple[str, int, int]]:
    out = []
    for p in PROMPTS:
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], temperature=0,
                                      max_tokens=32, extra_body={"ignore_eos": True})
        out.append((r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens))
    return out


def _group_members(pgid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if alive(int(p))]


def test_openai_client_chat_completion_and_stream(served):
    c = client(served.base_url)
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                     temperature=0, max_tokens=24)
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.completion_tokens <= 24 and chat.choices[0].finish_reason in ("stop", "length")
    comp = c.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert "Paris" in comp.choices[0].text
    chunks = list(c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story about a cat."}], max_tokens=32,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(text.split()) >= 10, text
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    stopped = c.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=30, stop=[" 7"])
    assert stopped.choices[0].finish_reason == "stop" and "7" not in stopped.choices[0].text


def test_greedy_matches_vllm_server_and_native_engine(served, tmp_path):
    ours = greedy(client(served.base_url))
    assert all(n == 32 for _, _, n in ours)
    ref = VllmServer(tmp_path)
    try:
        theirs = greedy(client(ref.base_url))
    finally:
        ref.stop()
    assert ours == theirs  # same prompt tokens (chat template), same 32 greedy tokens as text
    native = Serve(tmp_path, "--engine", "native", "--dtype", "float32", "--block-size", "32", workers=1,
                   model=str(model_dir()), env={"KVRELAY_SERVED_MODEL_NAME": MODEL}).start(timeout=120)
    try:
        assert greedy(client(native.base_url)) == ours
    finally:
        native.stop()


def test_kv_router_sends_a_repeated_prompt_to_the_worker_that_holds_it(served):
    discovery = DiscoveryConfig(discovery="file", discovery_dir=served.discovery_dir)
    before = asyncio.run(wait_idle(discovery, token=served.internal_token))
    c = client(served.base_url)
    long_prompt = " ".join(f"fact {i}: the number {i} follows {i - 1}." for i in range(1, 120))
    first = c.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens > 1000
    cached = []
    for _ in range(3):
        r = c.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4, temperature=0)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        assert r.choices[0].text == first.choices[0].text
    assert all(n >= first.usage.prompt_tokens - 64 for n in cached), cached  # all but the last blocks
    after = asyncio.run(wait_idle(discovery, token=served.internal_token))
    hits = {wid: after[wid][1].prefix_hit_tokens - before[wid][1].prefix_hit_tokens for wid in after}
    prompts = {wid: after[wid][1].prompt_tokens - before[wid][1].prompt_tokens for wid in after}
    holder = max(hits, key=hits.get)
    assert hits[holder] >= sum(cached) and prompts[holder] >= 4 * first.usage.prompt_tokens  # all four went there
    assert all(prompts[w] == 0 for w in prompts if w != holder), prompts


def test_sigkill_of_a_worker_mid_stream_completes_on_the_other(served):
    c = client(served.base_url)
    body = dict(model=MODEL, messages=[{"role": "user", "content": "Count from one to one hundred in words."}],
                temperature=0, max_tokens=160, extra_body={"ignore_eos": True})
    reference = c.chat.completions.create(**body).choices[0].message.content
    discovery = DiscoveryConfig(discovery="file", discovery_dir=served.discovery_dir)
    pieces: list[str] = []
    started = threading.Event()
    result: dict = {}

    def stream() -> None:
        try:
            for ch in c.chat.completions.create(**body, stream=True):
                if ch.choices and ch.choices[0].delta.content:
                    pieces.append(ch.choices[0].delta.content)
                    if len(pieces) >= 20:
                        started.set()
                if ch.choices and ch.choices[0].finish_reason:
                    result["finish"] = ch.choices[0].finish_reason
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = repr(e)
        started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(120)
    busy = [pid for pid, s in asyncio.run(worker_stats(discovery, token=served.internal_token)).values()
            if s.running]
    assert len(busy) == 1, busy
    group = os.getpgid(busy[0])  # the worker leads a process group holding vLLM's engine processes
    assert group == busy[0] and len(_group_members(group)) >= 3
    os.kill(busy[0], signal.SIGKILL)
    t.join(240)
    assert "error" not in result, result
    assert result.get("finish") == "length"
    assert "".join(pieces) == reference  # greedy: the other worker continued the same text
    deadline = time.monotonic() + 30
    while _group_members(group):  # vLLM's processes did not outlive the killed worker
        assert time.monotonic() < deadline, _group_members(group)
        time.sleep(0.2)
    deadline = time.monotonic() + 300  # the supervisor restarts the killed worker (the next tests need two)
    while True:
        try:
            if len(asyncio.run(worker_stats(discovery, token=served.internal_token))) == 2:
                break
        except Exception:  # noqa: BLE001 - the dead worker's registration is still being cleaned up
            pass
        assert time.monotonic() < deadline, served.read_log()
        time.sleep(1)


def test_on_etcd_and_nats_events_reach_the_router(tmp_path, etcd, nats):
    srv = vllm_serve(tmp_path, "--discovery", "etcd", "--etcd-endpoints", f"127.0.0.1:{etcd.port}",
                     "--events", "nats", "--nats-url", f"nats://127.0.0.1:{nats.port}", workers=1)
    try:
        c = client(srv.base_url)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                      temperature=0, max_tokens=24)
        assert "Paris" in r.choices[0].message.content
        long_prompt = " ".join(f"line {i} of the log." for i in range(150))
        c.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2, temperature=0)
        deadline = time.monotonic() + 30  # the router's index learns the blocks from vLLM's events via NATS
        while _metric(srv.base_url, "kvrelay_router_index_blocks{tier=\"G1\"}") < 4:
            assert time.monotonic() < deadline, srv.read_log()
            time.sleep(0.2)
        again = c.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens >= again.usage.prompt_tokens - 64
    finally:
        srv.stop()
