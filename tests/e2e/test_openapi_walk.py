"""Issue 28: every field of every request body in `/openapi.json` is honoured or refused. For each
property of the chat, completions and Responses request schemas, a request sets it to a non-default
value on a real `kvrelay serve` (tiny model, native engine, temperature 0 unless the field needs
sampling) and the test checks the field's effect against a baseline (or a control request), or that
the answer is a 400 whose `param` names the field. A property the walk has no probe for fails the
test, so a field added to the schema cannot be silently ignored; nothing may be a 5xx."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from kvrelay.frontend.openapi import openapi_document

MODEL = "kvrelay-tiny"
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses"}
BASE: dict[str, dict[str, Any]] = {
    "chat": {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
             "temperature": 0},
    "completions": {"model": MODEL, "prompt": "Hello there", "max_tokens": 8, "temperature": 0},
    "responses": {"model": MODEL, "input": "Hello there", "max_output_tokens": 8, "temperature": 0},
}
REQUIRED = {"model", "messages", "prompt", "input"}  # in every request of the walk
# Fields that change no output by definition -> (a value, why it is accepted).
NO_EFFECT: dict[tuple[str, str], tuple[Any, str]] = {
    ("chat", "user"): ("u-1", "OpenAI's end-user id for abuse monitoring: no effect on output in OpenAI or vLLM"),
    ("completions", "user"): ("u-1", "as chat's"),
    ("responses", "truncation"): ("disabled", "its one accepted value is what kvrelay does anyway: a prompt too "
                                              "long is a 400"),
}
EOS = {"1": 100, "3": 100}  # the tiny model's EOS ids, forced
TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}}]
RESPONSES_TOOLS = [{"type": "function", **TOOLS[0]["function"]}]
LONG = "A long shared preamble about cache salts. " * 12


class Walk:
    def __init__(self, client: httpx.Client, endpoint: str):
        self.client, self.endpoint = client, endpoint
        self.base = self.send()
        assert self.base.status_code == 200, self.base.text

    def send(self, **fields: Any) -> httpx.Response:
        r = self.client.post(ENDPOINTS[self.endpoint], json={**BASE[self.endpoint], **fields})
        assert r.status_code < 500, r.text
        return r

    def ok(self, **fields: Any) -> dict:
        r = self.send(**fields)
        assert r.status_code == 200, r.text
        return r.json()


def text(body: dict) -> str:
    if "output" in body:  # a Response
        return "".join(p["text"] for item in body["output"] if item["type"] == "message" for p in item["content"])
    c = body["choices"][0]
    return c["message"]["content"] or "" if "message" in c else c["text"]


def tokens(body: dict, kind: str = "completion") -> int:
    u = body["usage"]
    return u.get(f"{kind}_tokens", u.get({"completion": "output", "prompt": "input"}[kind] + "_tokens"))


def refused(field: str, **fields: Any) -> Callable[[Walk], None]:
    """The value is a 400 naming `field`."""
    def check(w: Walk) -> None:
        r = w.send(**fields)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith(field), r.text
    return check


def same_as_greedy(**fields: Any) -> Callable[[Walk], None]:
    """Sampling at temperature 1 with `fields` keeps only the top token: the greedy baseline."""
    def check(w: Walk) -> None:
        sampled = {"temperature": 1.0, **({"seed": 5} if w.endpoint != "responses" else {})}
        assert text(w.ok(**sampled)) != text(w.base.json())  # sampling alone changes it
        assert text(w.ok(**sampled, **fields)) == text(w.base.json())
    return check


def changes_output(**fields: Any) -> Callable[[Walk], None]:
    def check(w: Walk) -> None:
        longer = {"max_tokens": 24, "ignore_eos": True}  # long enough for the greedy text to repeat tokens
        assert text(w.ok(**longer, **fields)) != text(w.ok(**longer))
    return check


def constrained(pattern: str, **fields: Any) -> Callable[[Walk], None]:
    def check(w: Walk) -> None:
        out = text(w.ok(**fields))
        assert re.fullmatch(pattern, out), out
    return check


def check_stream(w: Walk) -> None:
    r = w.send(stream=True)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    if w.endpoint == "responses":
        assert events[-1]["type"] == "response.completed" and text(events[-1]["response"]) == text(w.base.json())
        return
    key = "delta" if w.endpoint == "chat" else None
    joined = "".join((c[key].get("content") or "") if key else c["text"] for e in events for c in e["choices"])
    assert joined == text(w.base.json())


def check_stream_options(w: Walk) -> None:
    if w.endpoint == "responses":
        return refused("stream_options", stream=True, stream_options={"include_obfuscation": True})(w)
    r = w.send(stream=True, stream_options={"include_usage": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens"] == tokens(w.base.json(), "prompt")


def check_n(w: Walk) -> None:
    assert [c["index"] for c in w.ok(n=2)["choices"]] == [0, 1]


def max_tokens(field: str) -> Callable[[Walk], None]:
    def check(w: Walk) -> None:
        assert tokens(w.base.json()) > 3 and tokens(w.ok(**{field: 3})) == 3
    return check


def check_seed(w: Walk) -> None:
    a, b = (text(w.ok(temperature=1.0, seed=s)) for s in (7, 7))
    assert a == b and a != text(w.ok(temperature=1.0, seed=8))


def check_temperature(w: Walk) -> None:
    sampled = {"seed": 5} if w.endpoint != "responses" else {}
    assert text(w.ok(temperature=1.0, **sampled)) != text(w.base.json())


def check_ignore_eos(w: Walk) -> None:
    assert tokens(w.ok(logit_bias=EOS)) <= 1
    assert tokens(w.ok(logit_bias=EOS, ignore_eos=True)) == 8


def check_min_tokens(w: Walk) -> None:
    assert tokens(w.ok(logit_bias=EOS)) <= 1
    assert tokens(w.ok(logit_bias=EOS, min_tokens=4)) >= 4


def check_stop(w: Walk) -> None:
    base = text(w.base.json())
    cut = base[2:6]
    assert cut and text(w.ok(stop=[cut])) == base[:base.index(cut)]


def check_stop_token_ids(w: Walk) -> None:
    assert text(w.ok(logit_bias={"4": 100})) == "!" * 8
    out = w.ok(logit_bias={"4": 100}, stop_token_ids=[4])
    assert text(out) == "" and out["choices"][0]["finish_reason"] == "stop"


def check_logit_bias(w: Walk) -> None:
    assert text(w.ok(logit_bias={"4": 100})) == "!" * 8 != text(w.base.json())


def check_cache_salt(w: Walk) -> None:
    messages = [{"role": "user", "content": f"{uuid.uuid4().hex} {LONG}"}]
    body = {"messages": messages} if w.endpoint == "chat" else {"prompt": messages[0]["content"]}
    w.ok(**body, max_tokens=1, cache_salt="a")
    again = w.ok(**body, max_tokens=1, cache_salt="a")
    other = w.ok(**body, max_tokens=1, cache_salt="b")
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def check_skip_special(w: Walk) -> None:
    assert text(w.ok(logit_bias={"2": 100})) == ""  # <|im_start|>, special
    assert text(w.ok(logit_bias={"2": 100}, skip_special_tokens=False)) == "<|im_start|>" * 8


def check_logprobs(w: Walk) -> None:
    if w.endpoint == "chat":
        body = w.ok(logprobs=True, ignore_eos=True)
        content = body["choices"][0]["logprobs"]["content"]
        assert len(content) == 8 and all(t["top_logprobs"] == [] for t in content)
    else:
        lp = w.ok(logprobs=2, ignore_eos=True)["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == 8 and all(1 <= len(d) <= 3 for d in lp["top_logprobs"])


def check_top_logprobs(w: Walk) -> None:
    content = w.ok(logprobs=True, top_logprobs=3)["choices"][0]["logprobs"]["content"]
    assert all(len(t["top_logprobs"]) == 3 for t in content)


def longer_prompt(**fields: Any) -> Callable[[Walk], None]:
    def check(w: Walk) -> None:
        assert tokens(w.ok(**fields), "prompt") > tokens(w.base.json(), "prompt")
    return check


def check_tool_choice(w: Walk) -> None:
    tools = RESPONSES_TOOLS if w.endpoint == "responses" else TOOLS
    body = w.ok(tools=tools, tool_choice="required", **{"max_output_tokens" if w.endpoint == "responses"
                                                       else "max_tokens": 60})
    if w.endpoint == "responses":
        assert [i["name"] for i in body["output"] if i["type"] == "function_call"][:1] == ["get_time"]
    else:
        assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"


def check_parallel(w: Walk) -> None:
    tools = RESPONSES_TOOLS if w.endpoint == "responses" else TOOLS
    limit = {"max_output_tokens" if w.endpoint == "responses" else "max_tokens": 200}
    body = w.ok(tools=tools, tool_choice="required", parallel_tool_calls=False, temperature=1.0, **limit)
    calls = ([i for i in body["output"] if i["type"] == "function_call"] if w.endpoint == "responses"
             else body["choices"][0]["message"]["tool_calls"])
    assert len(calls) == 1


def check_add_generation_prompt(w: Walk) -> None:
    assert tokens(w.ok(add_generation_prompt=False), "prompt") < tokens(w.base.json(), "prompt")


def echoed(field: str, value: Any, shown: Any = None) -> Callable[[Walk], None]:
    def check(w: Walk) -> None:
        assert w.ok(**{field: value})[field] == (value if shown is None else shown)
    return check


ENUM = {"type": "string", "enum": ["alpha", "beta"]}
COMMON: dict[str, Callable[[Walk], None]] = {
    "stream": check_stream, "stream_options": check_stream_options, "n": check_n,
    "max_tokens": max_tokens("max_tokens"), "temperature": check_temperature,
    "top_p": same_as_greedy(top_p=1e-9), "top_k": same_as_greedy(top_k=1), "min_p": same_as_greedy(min_p=1.0),
    "repetition_penalty": changes_output(repetition_penalty=2.0),
    "frequency_penalty": changes_output(frequency_penalty=2.0),
    "presence_penalty": changes_output(presence_penalty=2.0),
    "logit_bias": check_logit_bias, "min_tokens": check_min_tokens, "seed": check_seed, "stop": check_stop,
    "stop_token_ids": check_stop_token_ids, "ignore_eos": check_ignore_eos, "cache_salt": check_cache_salt,
    "structured_outputs": constrained("alpha|beta", structured_outputs={"choice": ["alpha", "beta"]}),
    "guided_json": constrained('"(alpha|beta)"', guided_json=ENUM),
    "guided_regex": constrained("[0-9]{3}", guided_regex="[0-9]{3}"),
    "guided_choice": constrained("yes|no", guided_choice=["yes", "no"]),
    "guided_grammar": constrained("ab|cd", guided_grammar='start: "ab" | "cd"'),
    "skip_special_tokens": check_skip_special, "logprobs": check_logprobs,
}
PROBES: dict[str, dict[str, Callable[[Walk], None]]] = {
    "chat": {**COMMON, "max_completion_tokens": max_tokens("max_completion_tokens"),
             "top_logprobs": check_top_logprobs, "tools": longer_prompt(tools=TOOLS),
             "tool_choice": check_tool_choice, "parallel_tool_calls": check_parallel,
             "response_format": constrained('"(alpha|beta)"', response_format={
                 "type": "json_schema", "json_schema": {"name": "e", "schema": ENUM}}),
             "add_generation_prompt": check_add_generation_prompt},
    "completions": {**COMMON, "echo": refused("echo", echo=True), "best_of": refused("best_of", best_of=2),
                    "suffix": refused("suffix", suffix="!")},
    "responses": {"instructions": longer_prompt(instructions="Answer in French."),
                  "tools": longer_prompt(tools=RESPONSES_TOOLS), "tool_choice": check_tool_choice,
                  "parallel_tool_calls": check_parallel, "max_output_tokens": max_tokens("max_output_tokens"),
                  "temperature": check_temperature, "top_p": same_as_greedy(top_p=1e-9),
                  "text": constrained('"(alpha|beta)"', text={"format": {"type": "json_schema", "name": "e",
                                                                        "schema": ENUM}}),
                  "stream": check_stream, "stream_options": check_stream_options,
                  "metadata": echoed("metadata", {"k": "v"}), "store": echoed("store", True, False),
                  "user": echoed("user", "u-1")},
}


def _properties(doc: dict) -> dict[str, list[str]]:
    """endpoint -> the properties of its request body schema."""
    schemas = doc["components"]["schemas"]
    out = {}
    for name, path in ENDPOINTS.items():
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        out[name] = list(schemas[ref.rsplit("/", 1)[1]]["properties"])
    return out


FIELDS = [(e, f) for e, props in _properties(openapi_document("walk")).items() for f in props if f not in REQUIRED]


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.base_url, timeout=120) as client:
        yield client


def test_the_walk_covers_the_served_document(http):
    served_fields = [(e, f) for e, props in _properties(http.get("/openapi.json").json()).items() for f in props
                     if f not in REQUIRED]
    assert served_fields == FIELDS
    missing = [(e, f) for e, f in FIELDS if f not in PROBES[e] and (e, f) not in NO_EFFECT]
    assert missing == []


@pytest.mark.parametrize(("endpoint", "field"), FIELDS, ids=[f"{e}.{f}" for e, f in FIELDS])
def test_field_is_honoured_or_refused(http, endpoint, field):
    if (endpoint, field) in NO_EFFECT:
        assert Walk(http, endpoint).ok(**{field: NO_EFFECT[endpoint, field][0]})  # accepted
        return
    PROBES[endpoint][field](Walk(http, endpoint))
