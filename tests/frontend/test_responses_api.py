"""The Responses API without a server: input items -> chat messages, request checks (400s naming the
Responses field), and the output items / stream events (typed by the `openai` client, streamed equal
to whole at every split)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import msgspec
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from kvrelay.frontend.openai_schema import ApiError
from kvrelay.frontend.pipeline import Piece, Usage
from kvrelay.frontend.responses_api_builder import ResponsesBuilder
from kvrelay.frontend.responses_api_input import chat_messages
from kvrelay.frontend.responses_api_request import parse_responses_request, renamed
from kvrelay.frontend.tool_parsers import pick_format

EVENTS = TypeAdapter(ResponseStreamEvent)


def _dicts(messages) -> list[dict]:
    return [msgspec.to_builtins(m) for m in messages]


def test_string_input_and_instructions():
    assert _dicts(chat_messages("Hi", None)) == [{"role": "user", "content": "Hi"}]
    assert _dicts(chat_messages("Hi", "Be brief.")) == [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "Hi"}]


def test_items_map_to_chat_turns():
    items = [
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather "},
                                                          {"type": "input_text", "text": "in Oslo?"}]},
        # an earlier response's output sent back: a message, then two calls of the same turn
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "get_weather",
         "arguments": '{"city": "Oslo"}', "status": "completed"},
        {"type": "function_call", "call_id": "call_b", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_a", "output": "12C"},
        {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "noon"}]},
        {"type": "function_call", "call_id": "call_c", "name": "get_time", "arguments": "{}"},
    ]
    assert _dicts(chat_messages(items, "Be brief.")) == [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "content": "12C", "tool_call_id": "call_a"},
        {"role": "tool", "content": "noon", "tool_call_id": "call_b"},
        # a call after tool results starts a new assistant turn
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    ]


@pytest.mark.parametrize(("input", "param"), [
    ([], "input"),
    ([5], "input[0]"),
    ([{"role": "tool", "content": "x"}], "input[0].role"),
    ([{"role": "user"}], "input[0].content"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}], "input[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "input_text"}]}], "input[0].content[0].text"),
    ([{"role": "user", "content": "x", "phase": "final_answer"}], "input[0].phase"),
    ([{"type": "item_reference", "id": "msg_1"}], "input[0].type"),
    ([{"type": "reasoning", "summary": []}], "input[0].type"),
    ([{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}], "input[0].arguments"),
    ([{"type": "function_call", "call_id": "c", "arguments": "{}"}], "input[0].name"),
    ([{"type": "function_call_output", "output": "x"}], "input[0].call_id"),
    ([{"type": "function_call_output", "call_id": "c", "output": 3}], "input[0].output"),
])
def test_bad_items_name_the_field(input, param):
    with pytest.raises(ApiError) as e:
        chat_messages(input, None)
    assert e.value.status == 400 and e.value.param == param


def _parse(**body) -> object:
    return parse_responses_request(json.dumps({"model": "m", "input": "x", **body}).encode())


@pytest.mark.parametrize(("body", "param"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"truncation": "auto"}, "truncation"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}, "extra": 1}}}, "text.format.extra"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "f", "defer_loading": True}]}, "tools[0].defer_loading"),
    ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, "tool_choice"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"input": [{"role": "user", "content": "x", "bogus": 1}]}, "input[0].bogus"),
])
def test_refused_fields_are_400_naming_them(body, param):
    with pytest.raises(ApiError) as e:
        _parse(**body)
    assert e.value.status == 400 and e.value.param == param, e.value.message
    assert f"'{param}'" in e.value.message


def test_previous_response_id_says_why():
    with pytest.raises(ApiError) as e:
        _parse(previous_response_id="resp_1")
    assert "stateless" in e.value.message


def test_fields_reach_the_chat_request():
    req = _parse(tools=[{"type": "function", "name": "f", "description": "d", "parameters": None, "strict": True}],
                 tool_choice={"type": "function", "name": "f"}, parallel_tool_calls=False, max_output_tokens=7,
                 temperature=0.5, top_p=0.9, user="u", store=True, metadata={"a": "b"},
                 text={"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}, "strict": True}})
    chat = req.chat_request()
    assert chat.tools == [{"type": "function", "function": {"name": "f", "description": "d", "strict": True}}]
    assert chat.tool_choice == {"type": "function", "function": {"name": "f"}}
    assert chat.response_format == {"type": "json_schema",
                                    "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": True}}
    assert (chat.parallel_tool_calls, chat.max_completion_tokens, chat.temperature, chat.top_p, chat.user) == (
        False, 7, 0.5, 0.9, "u")


@pytest.mark.parametrize(("chat_param", "param"), [
    ("tools[1].function.name", "tools[1].name"), ("tool_choice.function.name", "tool_choice.name"),
    ("response_format.json_schema.schema", "text.format.schema"), ("response_format", "text.format"),
    ("max_completion_tokens", "max_output_tokens"), ("messages", "input"), ("messages[3].content", "input"),
    ("temperature", "temperature"),
])
def test_chat_errors_are_renamed(chat_param, param):
    e = renamed(ApiError.bad_request(f"Invalid '{chat_param}': bad.", chat_param))
    assert e.param == param and e.message == f"Invalid '{param}': bad."


HERMES, _ = pick_format("hermes", "")
OUTPUT = 'Sure. <tool_call>\n{"name": "f", "arguments": {"a": [1, "}"]}}\n</tool_call>\n<tool_call>\n' \
         '{"name": "g", "arguments": {}}\n</tool_call>'


def _builder(tools: bool):
    prepared = SimpleNamespace(model="m", usage=Usage(5, 3, 1), tool_format=HERMES if tools else None,
                               max_tool_calls=None, request=SimpleNamespace(sampling=SimpleNamespace(
                                   temperature=0.0, top_p=1.0)))
    return ResponsesBuilder(prepared, _parse())


def _streamed(tools: bool, pieces: list[str], finish: str) -> tuple[list[dict], Response]:
    b = _builder(tools)
    raw = b.head_sse() + b"".join(b.sse(Piece(t, [1], None, finish if i == len(pieces) - 1 else None))
                                  for i, t in enumerate(pieces)) + b.tail_sse()
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]
    for e in events:
        EVENTS.validate_python(e)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events, Response.model_validate(events[-1]["response"])


def _whole(tools: bool, text: str, finish: str) -> Response:
    async def pieces():
        yield Piece(text, [1], None, finish)
    body = asyncio.run(_builder(tools).collect(pieces()))
    return Response.model_validate(json.loads(msgspec.json.encode(body)))


def _shape(r: Response) -> list[tuple]:
    return [(o.type, getattr(o, "name", None), getattr(o, "arguments", None), o.status) for o in r.output]


@pytest.mark.parametrize("tools", [False, True])
def test_streamed_equals_whole_at_every_split(tools):
    whole = _whole(tools, OUTPUT, "stop")
    for cut in range(1, len(OUTPUT)):
        events, final = _streamed(tools, [OUTPUT[:cut], OUTPUT[cut:]], "stop")
        assert _shape(final) == _shape(whole) and final.output_text == whole.output_text
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert deltas == whole.output_text
        for i, item in enumerate(final.output):
            if item.type == "function_call":
                args = "".join(e["delta"] for e in events
                               if e["type"] == "response.function_call_arguments.delta" and e["output_index"] == i)
                assert args == item.arguments
    if tools:
        assert whole.output_text == "Sure." and [s[:3] for s in _shape(whole)[1:]] == [
            ("function_call", "f", '{"a": [1, "}"]}'), ("function_call", "g", "{}")]
    else:
        assert whole.output_text == OUTPUT and len(whole.output) == 1


def test_event_order_and_incomplete():
    events, final = _streamed(False, ["Hel", "lo"], "length")
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.incomplete"]
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].status == "incomplete"
    assert final.usage.input_tokens == 5 and final.usage.output_tokens == 3 and final.usage.total_tokens == 8
    assert final.usage.input_tokens_details.cached_tokens == 1 and final.usage.output_tokens_details.reasoning_tokens == 0


def test_empty_output_is_one_empty_message():
    for r in (_whole(False, "", "stop"), _streamed(True, [""], "stop")[1]):
        assert r.output_text == "" and [o.type for o in r.output] == ["message"] and r.status == "completed"


def test_failure_after_the_head_is_error_then_failed():
    b = _builder(False)
    b.head_sse()
    b.sse(Piece("x", [1], None))
    raw = b.error_sse(ApiError.worker_failed("gone"))
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["error", "response.failed"]
    assert events[0]["code"] == "worker_failed"
    failed = EVENTS.validate_python(events[1]).response
    assert failed.status == "failed" and failed.error.code == "server_error" and failed.output_text == "x"
