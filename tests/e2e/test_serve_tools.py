"""Tool calling through `kvrelay serve` (tiny model, native engine) with the official `openai` client.

The tiny model has random weights and never calls a tool by itself: `tool_choice` required and named
(grammar-enforced) make it call, which is what these tests check on every try; the parser's own cases
are in tests/frontend/test_tool_calls.py."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

MODEL = "kvrelay-tiny"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "minimum": 1,
                                                                                    "maximum": 7}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]




def _valid(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def _streamed_calls(stream) -> tuple[str, list[dict], str]:
    """(content, calls, finish_reason) from chat chunks, checking OpenAI's tool_calls delta shape."""
    content, calls, finish = "", [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.id is not None:  # a new call: id, type and name before any arguments
                assert d.index == len(calls) and d.type == "function" and d.function.name
                calls.append({"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""})
            else:
                assert d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
        finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_calls_are_valid_every_time(client, choice):
    for seed in range(3):
        out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                             temperature=1.0, seed=seed, max_tokens=200)
        c = out.choices[0]
        finish_reason = "stop" if isinstance(choice, dict) else "tool_calls"  # named: "stop", as OpenAI's
        assert c.finish_reason == finish_reason and c.message.content is None and c.message.tool_calls
        for call in c.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            _valid(call.function.name, call.function.arguments)
        if isinstance(choice, dict):
            assert [t.function.name for t in c.message.tool_calls] == ["get_time"]
        content, calls, finish = _streamed_calls(client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=seed,
            max_tokens=200, stream=True))
        assert finish == finish_reason and content == "" and calls
        for call in calls:
            _valid(call["name"], call["arguments"])
        # same seed, same tokens: the stream carries the non-streamed calls (ids aside)
        assert [(x["name"], x["arguments"]) for x in calls] == [
            (t.function.name, t.function.arguments) for t in c.message.tool_calls]


def test_parallel_tool_calls_false_makes_one_call(client):
    for seed in range(3):
        out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=200)
        assert len(out.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_round_trip(client, stream):
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0, max_tokens=200)
    msg = first.choices[0].message
    call = msg.tool_calls[0]
    history = [*ASK, msg.model_dump(exclude_none=True) | {"content": None},
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 12})}]
    assert history[1]["content"] is None and history[1]["tool_calls"][0]["id"] == call.id
    if not stream:
        out = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
        assert out.usage.prompt_tokens > first.usage.prompt_tokens
        return
    chunks = list(client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tools_change_the_prompt(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    with_tools = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=1)
    offered_not_called = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                                        max_tokens=1)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tools' schemas are in it
    assert offered_not_called.usage.prompt_tokens == with_tools.usage.prompt_tokens  # none: offered (vLLM)
    assert offered_not_called.choices[0].message.tool_calls is None


@pytest.mark.parametrize(("body", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}],
      "tool_choice": "required"}, "tools"),
    ({"messages": [*ASK, {"role": "tool", "content": "12C"}]}, "messages[1].tool_call_id"),
])
def test_bad_tool_fields_are_400(served, body, param):
    r = httpx.post(f"{served.base_url}/v1/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
