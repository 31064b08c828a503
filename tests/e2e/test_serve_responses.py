"""`POST /v1/responses` through `kvrelay serve` (tiny model, native engine) with the official `openai`
client: typed responses whose text equals the chat path's for the same conversation (greedy), the
event stream, structured output, a forced function call and its round trip, and 400s naming the field."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import pydantic
import pytest
from openai.types.responses import Response

MODEL = "kvrelay-tiny"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER,
          "strict": True}]
ASK = "What is the weather in Oslo?"


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    kind: Literal["cat", "dog", "fish"]




def _chat(client, messages, max_tokens):
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
    return out.choices[0], out.usage


@pytest.mark.parametrize(("input", "instructions", "messages"), [
    ("Tell me a story.", None, [{"role": "user", "content": "Tell me a story."}]),
    ([{"role": "user", "content": [{"type": "input_text", "text": "Tell me "}, {"type": "input_text", "text": "a story."}]}],
     "Be brief.", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
      {"type": "message", "role": "user", "content": "Again"}], None,
     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"}]),
])
def test_create_equals_the_chat_path(client, input, instructions, messages):
    r = client.responses.create(model=MODEL, input=input, instructions=instructions, max_output_tokens=12,
                                temperature=0, metadata={"k": "v"})
    assert isinstance(r, Response) and r.object == "response" and r.id.startswith("resp_")
    choice, usage = _chat(client, messages, 12)
    assert r.output_text == choice.message.content  # same prompt, same greedy tokens
    assert r.usage.input_tokens == usage.prompt_tokens and r.usage.output_tokens == usage.completion_tokens
    assert r.usage.total_tokens == usage.total_tokens and r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.status == ("incomplete" if choice.finish_reason == "length" else "completed")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert r.metadata == {"k": "v"} and r.instructions == instructions and r.max_output_tokens == 12
    assert r.temperature == 0 and r.model == MODEL and [o.type for o in r.output] == ["message"]


def test_stream_events_and_text_equal_the_whole(client):
    whole = client.responses.create(model=MODEL, input="Tell me a story.", max_output_tokens=16, temperature=0)
    events = list(client.responses.create(model=MODEL, input="Tell me a story.", max_output_tokens=16, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    last = "response.incomplete" if whole.status == "incomplete" else "response.completed"
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", last]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-4].text
    assert events[-1].response.output_text == whole.output_text and events[-1].response.usage == whole.usage


def test_json_schema_output_parses_and_streams(client):
    parsed = client.responses.parse(model=MODEL, input="Describe a pet.", text_format=Pet, temperature=0,
                                    max_output_tokens=200)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Pet)
    assert len(parsed.output_parsed.name) <= 8
    with client.responses.stream(model=MODEL, input="Describe a pet.", text_format=Pet, temperature=0,
                                 max_output_tokens=200) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert deltas == parsed.output_text and final.output_parsed == parsed.output_parsed
    obj = client.responses.create(model=MODEL, input="JSON please.", text={"format": {"type": "json_object"}},
                                  temperature=0, max_output_tokens=200)
    assert obj.status == "completed" and isinstance(json.loads(obj.output_text), dict)


def _calls(r: Response) -> list:
    return [o for o in r.output if o.type == "function_call"]


def test_forced_call_and_round_trip(client):
    first = client.responses.create(model=MODEL, input=ASK, tools=TOOLS, tool_choice="required", temperature=0,
                                    max_output_tokens=200, parallel_tool_calls=False)
    calls = _calls(first)
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    assert first.status == "completed" and first.tool_choice == "required" and first.tools[0].name == "get_weather"
    # streamed: the same call, its arguments in deltas
    events = list(client.responses.create(model=MODEL, input=ASK, tools=TOOLS, tool_choice="required", temperature=0,
                                          max_output_tokens=200, parallel_tool_calls=False, stream=True))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert args == done[0].arguments == calls[0].arguments
    # named choice in the Responses shape
    named = client.responses.create(model=MODEL, input=ASK, tools=TOOLS, temperature=0, max_output_tokens=200,
                                    tool_choice={"type": "function", "name": "get_weather"})
    assert [c.name for c in _calls(named)] == ["get_weather"]
    # the round trip: the earlier output items sent back, with the function's result
    follow = [{"role": "user", "content": ASK}, *[o.model_dump(exclude_none=True) for o in first.output],
              {"type": "function_call_output", "call_id": calls[0].call_id, "output": json.dumps({"temp_c": 12})}]
    second = client.responses.create(model=MODEL, input=follow, tools=TOOLS, temperature=0, max_output_tokens=8)
    assert second.status in ("completed", "incomplete")
    assert second.usage.input_tokens > first.usage.input_tokens


@pytest.mark.parametrize(("body", "param"), [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
    ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "frob"}}}}, "text.format.schema"),
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"max_output_tokens": 10**9}, "input"),  # context_length_exceeded names the prompt, as the chat path
    ({"model": "nope"}, "model"),
])
def test_bad_requests_name_the_field(served, body, param):
    r = httpx.post(f"{served.base_url}/v1/responses", timeout=30,
                   json={"model": MODEL, "input": ASK, "max_output_tokens": 4, **body})
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["param"] == param and set(err) == {"message", "type", "param", "code"}, err
    if param == "previous_response_id":
        assert "stateless" in err["message"]
    if err["code"] == "context_length_exceeded":
        assert "max_output_tokens" in err["message"]


def test_openapi_describes_responses(served):
    doc = httpx.get(f"{served.base_url}/openapi.json", timeout=30).json()
    assert "/v1/responses" in doc["paths"]
    assert set(doc["components"]["schemas"]["ResponsesRequest"]["required"]) == {"model", "input"}
