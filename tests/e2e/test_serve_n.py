"""`n` > 1 through `kvrelay serve` with the official `openai` client (frontend/choices.py): n choices,
choice i equal to the n=1 answer with seed + i, streamed equal to whole, and the prompt prefilled once."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import openai
import pytest

from kvrelay.runtime.discovery import DiscoveryConfig, list_instances, make_discovery
from kvrelay.runtime.rpc import RpcClient
from kvrelay.workers.api.endpoints import Endpoint
from kvrelay.workers.api.messages import Empty, ModelCard
from tests.e2e.serve import Serve, wait_idle

MODEL = "kvrelay-tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    srv = Serve(tmp_path_factory.mktemp("serve-n")).start()  # two workers: all n must share one
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)


def test_seeded_choices_equal_n1_with_seed_plus_i(client):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a story"}], "max_tokens": 12,
            "temperature": 1.0}
    many = client.chat.completions.create(n=4, seed=1234, **chat)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    singles = [client.chat.completions.create(seed=1234 + i, **chat) for i in range(4)]
    assert [c.message.content for c in many.choices] == [s.choices[0].message.content for s in singles]
    assert [c.finish_reason for c in many.choices] == [s.choices[0].finish_reason for s in singles]
    assert len({c.message.content for c in many.choices}) > 1  # distinct streams, not one copied
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)

    comp = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 1.0}
    many_c = client.completions.create(n=4, seed=77, best_of=4, **comp)
    singles_c = [client.completions.create(seed=77 + i, **comp) for i in range(4)]
    assert [c.text for c in many_c.choices] == [s.choices[0].text for s in singles_c]
    assert [c.index for c in many_c.choices] == [0, 1, 2, 3]


def test_greedy_choices_are_equal(client):
    one = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    many = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0, n=4)
    assert [c.text for c in many.choices] == [one.choices[0].text] * 4
    assert many.usage.completion_tokens == 4 * one.usage.completion_tokens


def test_streamed_choices_equal_whole(client, served):
    comp = {"model": MODEL, "prompt": "In a village", "max_tokens": 10, "temperature": 1.0, "seed": 5, "n": 4}
    whole = client.completions.create(**comp)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **comp))
    texts, finishes = ["" for _ in range(4)], [[] for _ in range(4)]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason is not None:
                finishes[ch.index].append(ch.finish_reason)
    assert texts == [c.text for c in whole.choices]
    assert finishes == [[c.finish_reason] for c in whole.choices]  # one finish_reason per choice
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0] and not chunks[-1].choices
    assert usage_chunks[0].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10,
            "temperature": 1.0, "seed": 9, "n": 3}
    whole_chat = client.chat.completions.create(**chat)
    contents, roles = ["" for _ in range(3)], [0] * 3
    for c in client.chat.completions.create(stream=True, **chat):
        for ch in c.choices:
            contents[ch.index] += ch.delta.content or ""
            roles[ch.index] += ch.delta.role == "assistant"
    assert contents == [c.message.content for c in whole_chat.choices] and roles == [1, 1, 1]

    raw = httpx.post(f"{served.base_url}/v1/completions", json={**comp, "stream": True}, timeout=60).text
    assert raw.count("data: [DONE]") == 1 and raw.endswith("data: [DONE]\n\n")


def test_prompt_prefilled_once(served, client):
    discovery = DiscoveryConfig(discovery="file", discovery_dir=served.discovery_dir)
    before = asyncio.run(wait_idle(discovery, token=served.internal_token))
    block_size = asyncio.run(_block_size(discovery, served.internal_token))
    prompt = f"Session {uuid.uuid4().hex}. " + "The quick brown fox jumps over the lazy dog. " * 10
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, n=4)
    p = reply.usage.prompt_tokens
    assert p >= 200 and len(reply.choices) == 4
    after = asyncio.run(wait_idle(discovery, token=served.internal_token))
    prompts = {w: after[w][1].prompt_tokens - before[w][1].prompt_tokens for w in after}
    hits = {w: after[w][1].prefix_hit_tokens - before[w][1].prefix_hit_tokens for w in after}
    worker = max(prompts, key=lambda w: prompts[w])
    assert prompts[worker] == 4 * p and sum(prompts.values()) == 4 * p, prompts  # all four on one worker
    full_blocks = (p - 1) // block_size * block_size  # a sequence always computes its last prompt token
    assert hits[worker] == 3 * full_blocks, (hits, p, block_size)  # choice 0 prefilled, the others hit
    print(f"n=4, {p}-token prompt: {hits[worker]} prefix-hit tokens of {prompts[worker]}")


def test_n_and_best_of_bounds(served):
    url = f"{served.base_url}/v1/completions"
    r = httpx.post(url, json={"model": MODEL, "prompt": "x", "n": 17})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(f"{served.base_url}/v1/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(url, json={"model": MODEL, "prompt": "x", "n": 2, "best_of": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    r = httpx.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": 2, "n": 16})
    assert r.status_code == 200 and [c["index"] for c in json.loads(r.text)["choices"]] == list(range(16))


async def _block_size(discovery: DiscoveryConfig, token: str) -> int:
    disc = make_discovery(discovery)
    await disc.start()
    rpc = RpcClient(token=token)
    try:
        inst = (await list_instances(disc, "default"))[0]
        return (await rpc.unary(inst.address, Endpoint.MODEL_CARD, Empty(), ModelCard)).block_size
    finally:
        await rpc.close()
        await disc.close()
