"""Issue 14: nothing a client sends is a 5xx. Hypothesis bodies generated from the server's own
`/openapi.json` (2,000 per generate endpoint, a fixed seed) go to a real `kvrelay serve` (mocker
engine: valid ones generate for real); every answer is < 500 and every error is OpenAI's error JSON,
and a stream never carries an internal error."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.serve import Serve
from tests.frontend.schema_fuzz import from_schema, nested

MODEL = "kvrelay-tiny"
EXAMPLES = 2000
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    srv = Serve(tmp_path_factory.mktemp("fuzz"), "--engine", "mocker", "--mocker-speedup", "1e9",
                "--max-model-len", "256", workers=1).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(served):
    with httpx.Client(base_url=served.base_url, timeout=30) as client:
        doc = client.get("/openapi.json").json()
        yield client, doc


def check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        assert set(err) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        if events[0].startswith('{"type":"response.'):  # /v1/responses: typed events, no [DONE]
            assert json.loads(events[-1])["type"] in ("response.completed", "response.incomplete",
                                                      "response.failed"), events[-1]
            assert all(json.loads(e).get("code") != "internal_error" for e in events), events
            return
        assert events[-1] == "[DONE]"
        for e in events[:-1]:
            assert json.loads(e).get("error", {}).get("type") != "internal_error", e


def test_openapi_document_describes_the_served_api(api):
    client, doc = api
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/health",
            "/ready"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert set(chat["required"]) == {"model", "messages"}
    seed = next(s for s in chat["properties"]["seed"]["anyOf"] if s.get("type") == "integer")
    assert seed["maximum"] == 2**63 - 1  # the declared bounds are the enforced ones
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "seed": seed["maximum"] + 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "seed": seed["maximum"], "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("body", [
    b'{"model": "kvrelay-tiny", "prompt": ' + nested(10_000) + b"}",
    b'{"model": "kvrelay-tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"a": '
    + nested(10_000) + b"}]}",
    b'{"model": "kvrelay-tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"a": '
    + nested(200) + b"}]}",
    b'{"model": "kvrelay-tiny", "prompt": "x", "top_k": 18446744073709551616}',
    b'{"model": "kvrelay-tiny", "prompt": "x", "seed": -9223372036854775809, "stream": true}',
    b'{"model": "kvrelay-tiny", "prompt": "x", "top_k": 1e30}',
    b'{"model": "kvrelay-tiny", "prompt": [99999999999999999999]}',
], ids=["deep-prompt", "deep-tools", "tools-200", "top_k-2^64", "seed-below-int64", "top_k-float", "token-2^66"])
def test_hostile_bodies_are_400(api, body):
    client, _ = api
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    check_answer(r)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path,schema", [("/v1/chat/completions", "ChatCompletionRequest"),
                                         ("/v1/completions", "CompletionRequest"),
                                         ("/v1/responses", "ResponsesRequest")])
def test_fuzzed_bodies_never_5xx(api, path, schema):
    client, doc = api
    components = doc["components"]["schemas"]
    overrides = {"model": st.sampled_from([MODEL, MODEL, MODEL, "other-model"]),
                 "prompt": st.text(max_size=40) | st.lists(st.integers(-2, 700), max_size=12) | st.none(),
                 "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                             "content": st.text(max_size=40)}), min_size=1, max_size=3)
                 | from_schema(components[schema]["properties"].get("messages", {}), components, top=False),
                 "input": st.text(max_size=40) | st.lists(st.fixed_dictionaries({
                     "role": st.sampled_from(["user", "system", "assistant", "tool"]),
                     "content": st.text(max_size=40) | st.lists(st.fixed_dictionaries({
                         "type": st.sampled_from(["input_text", "output_text", "input_image"]),
                         "text": st.text(max_size=20)}), max_size=2)}), max_size=3)
                 | from_schema(components[schema]["properties"].get("input", {}), components, top=False)}
    bodies = from_schema(components[schema], components, overrides)
    counts: dict[int, int] = {}
    started = time.monotonic()

    @FUZZ
    @given(body=bodies | st.binary(max_size=40).map(lambda b: {"__raw__": b}))
    def one(body):
        raw = body.pop("__raw__", None) if isinstance(body, dict) and "__raw__" in body else None
        r = client.post(path, content=raw if raw is not None else json.dumps(body),
                        headers={"content-type": "application/json"})
        counts[r.status_code] = counts.get(r.status_code, 0) + 1
        check_answer(r)

    one()
    print(f"\n{path}: {sum(counts.values())} bodies in {time.monotonic() - started:.0f}s, statuses {sorted(counts.items())}")
    assert sum(counts.values()) >= EXAMPLES
    assert counts.get(200, 0) >= EXAMPLES // 10  # the success path was exercised, not only rejections
