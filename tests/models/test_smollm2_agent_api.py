"""Issue 28's native-engine acceptance on the real default model (SmolLM2-135M-Instruct) through
`kvrelay serve` and the official `openai` client: every `json_schema` output of the fixed schema set
(perf/structured_schemas.py) x 3 seeds parses and validates, `tool_choice: "required"` yields a valid call
on every try, and `n=4` returns 4 choices with the prompt prefilled once (the worker's counters). The
tiny-model versions of these tests (tests/workers/test_structured_native.py, tests/e2e/test_serve_tools.py,
tests/e2e/test_serve_n.py) show the mechanism; these show it on a model that writes real text."""

from __future__ import annotations

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from kvrelay.perf.structured_schemas import SCHEMAS
from kvrelay.runtime.discovery import DiscoveryConfig
from tests.e2e.serve import Serve, wait_idle
from tests.e2e.test_serve_n import _block_size
from tests.e2e.test_serve_tools import ASK, TOOLS
from tests.e2e.test_serve_tools import SCHEMAS as TOOL_SCHEMAS
from tests.models.smollm2 import model_dir

pytestmark = pytest.mark.slow  # ~70 SmolLM2 generations of up to 200 tokens on CPU
MODEL = "smollm2"
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    srv = Serve(tmp_path_factory.mktemp("smollm2-agents"), "--engine", "native", workers=1, model=str(model_dir()),
                env={"KVRELAY_SERVED_MODEL_NAME": MODEL}).start(timeout=300)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0, timeout=600)


def test_every_schema_validates_on_three_seeds(client):
    assert len(SCHEMAS) >= 20

    def ask(job: tuple[int, int]) -> tuple[int, int, str, str]:
        i, seed = job
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Reply with JSON for a small record."}],
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i],
                                                                    "strict": True}},
            temperature=1.0, seed=seed, max_tokens=400)
        return i, seed, r.choices[0].finish_reason, r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:  # the engine batches them
        replies = list(pool.map(ask, [(i, s) for i in range(len(SCHEMAS)) for s in SEEDS]))
    for i, seed, finish, content in replies:
        assert finish == "stop", (i, seed, content)  # the grammar completed, not cut at max_tokens
        jsonschema.validate(json.loads(content), SCHEMAS[i])


def test_required_tool_choice_is_a_valid_call_every_try(client):
    for seed in range(8):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=300)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls, (seed, c)
        for call in c.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])


def test_n4_prefills_the_prompt_once(served, client):
    discovery = DiscoveryConfig(discovery="file", discovery_dir=served.discovery_dir)
    before = asyncio.run(wait_idle(discovery, token=served.internal_token))
    block_size = asyncio.run(_block_size(discovery, served.internal_token))
    prompt = f"Session {uuid.uuid4().hex}. " + "The quick brown fox jumps over the lazy dog. " * 10
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, n=4, temperature=1.0, seed=1)
    p = reply.usage.prompt_tokens
    assert p >= 100 and [c.index for c in reply.choices] == [0, 1, 2, 3]
    after = asyncio.run(wait_idle(discovery, token=served.internal_token))
    (worker,) = after
    prompts = after[worker][1].prompt_tokens - before[worker][1].prompt_tokens
    hits = after[worker][1].prefix_hit_tokens - before[worker][1].prefix_hit_tokens
    full_blocks = (p - 1) // block_size * block_size  # a sequence always computes its last prompt token
    assert prompts == 4 * p and hits == 3 * full_blocks, (prompts, hits, p, block_size)
    computed = prompts - hits
    assert computed == p + 3 * (p - full_blocks)  # the prompt once, plus each other choice's partial tail
