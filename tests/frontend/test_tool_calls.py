"""Tool calling's pure parts: the hermes parser (whole and streamed at every split), the forced-call grammar,
the fallback rendering for templates without tool support, and tools/tool_choice validation."""

from __future__ import annotations

import json

import llguidance
import pytest

from kvrelay.frontend.openai_schema import ApiError, parse_chat_request
from kvrelay.frontend.tool_call_stream import CallDelta, ToolCallStream, parse_tool_calls
from kvrelay.frontend.tool_parsers import HERMES, pick_format
from kvrelay.frontend.tool_prompt import TOOLS_PROMPT, template_inputs
from kvrelay.frontend.tool_request import tool_request
from kvrelay.workers.api.structured import StructuredOutput, grammar_error

CALL_A = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris {x}", "days": [1, 2], "q": "a\\"}"}}\n</tool_call>'
ARGS_A = '{"city": "Paris {x}", "days": [1, 2], "q": "a\\"}"}'
CALL_B = '<tool_call>\n{"arguments": {}, "name": "now"}\n</tool_call>'  # name after the arguments

CASES = [  # text -> (content, [(name, arguments)])
    ("Hello there, no tools.\n", ("Hello there, no tools.\n", [])),
    (CALL_A, (None, [("get_weather", ARGS_A)])),
    ("Let me check.\n" + CALL_A + "\n" + CALL_B, ("Let me check.", [("get_weather", ARGS_A), ("now", "{}")])),
    (CALL_A + "\nDone.", ("Done.", [("get_weather", ARGS_A)])),
    ('<tool_call>{"name": "f"}</tool_call>', (None, [("f", "{}")])),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', (None, [("f", '{"a": 1}')])),
    ("x <tool_call>{not json</tool_call> y", ("x <tool_call>{not json</tool_call> y", [])),
    ('<tool_call>{"arguments": {}}</tool_call>', ('<tool_call>{"arguments": {}}</tool_call>', [])),
    ('<tool_call>["f"]</tool_call>', ('<tool_call>["f"]</tool_call>', [])),
    ("a <tool_cal b", ("a <tool_cal b", [])),
    ("ends with <tool_ca", ("ends with <tool_ca", [])),
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}', (None, [("f", '{"a": 1}')])),  # unclosed, complete
    ('<tool_call>\n{"arguments": {"a": ', ('<tool_call>\n{"arguments": {"a": ', [])),  # unclosed, cut
    ("<tool_call>" + "[" * 5000 + "</tool_call>", ("<tool_call>" + "[" * 5000 + "</tool_call>", [])),
]


def _calls(calls):
    return [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_whole_output(text, expected):
    content, calls = parse_tool_calls(HERMES, text)
    assert (content, _calls(calls)) == expected
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in calls)
    assert len({c.id for c in calls}) == len(calls)


def _stream(text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]], list]:
    stream, events, last = ToolCallStream(HERMES), [], 0
    for cut in [*cuts, len(text)]:
        events += stream.feed(text[last:cut])
        last = cut
    events += stream.finish()
    content = "".join(e for e in events if isinstance(e, str))
    calls: list[list[str]] = []
    for e in events:
        if isinstance(e, CallDelta):
            if e.id is not None:
                assert e.index == len(calls) and e.arguments == "" and e.name  # announced: name first
                calls.append([e.name, ""])
            else:
                calls[e.index][1] += e.arguments
    return content, [(n, a) for n, a in calls], events


@pytest.mark.parametrize(("text", "expected"), CASES[:-1])
def test_streamed_at_every_split_equals_whole(text, expected):
    content, calls = expected
    for cut in range(len(text) + 1):
        got_content, got_calls, events = _stream(text, [cut])
        assert (got_content or None if calls else got_content, got_calls) == (content, calls), cut
        assert not any(isinstance(e, str) and "<tool_call>" in e for e in events) or not calls


def test_streamed_one_character_at_a_time_sends_arguments_in_pieces():
    text = "Sure." + "\n" + CALL_A + "\n" + CALL_A
    content, calls, events = _stream(text, list(range(1, len(text))))
    assert content == "Sure." and calls == [("get_weather", ARGS_A)] * 2
    pieces = [e for e in events if isinstance(e, CallDelta) and e.index == 0 and e.id is None]
    assert len(pieces) == len(ARGS_A)  # streamed as written, not at the close
    assert not any("<" in e or "tool_call" in e for e in events if isinstance(e, str))


def test_malformed_after_the_name_was_streamed_keeps_the_call():
    text = '<tool_call>{"name": "f", "arguments": {"a": 1}, oops}</tool_call>tail'
    content, calls, _ = _stream(text, list(range(1, len(text))))
    assert calls == [("f", '{"a": 1}')] and content == "tail"
    assert _calls(parse_tool_calls(HERMES, text)[1]) == []  # whole: decided before anything was sent


def test_max_calls_drops_later_calls():
    content, calls = parse_tool_calls(HERMES, CALL_A + "\n" + CALL_B, max_calls=1)
    assert content is None and _calls(calls) == [("get_weather", ARGS_A)]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}},
                                               "required": ["city"]}}},
         {"type": "function", "function": {"name": "now"}}]


def test_forced_grammar_compiles_and_accepts_only_calls():
    req = tool_request(TOOLS, "required", None)
    grammar = HERMES.forced_grammar(req.forced, parallel=True)
    assert grammar_error(StructuredOutput(kind="grammar", spec=grammar)) is None
    matcher = llguidance.LLMatcher(llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTok())),
                                   llguidance.grammar_from("grammar", grammar))
    ok = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert matcher.validate_tokens(list(ok.encode())) == len(ok.encode())
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"days": 3}}\n</tool_call>'  # city is required
    assert matcher.validate_tokens(list(bad.encode())) < len(bad.encode())


class _ByteTok:
    """A 256-token byte vocabulary, enough to ask a grammar which texts it accepts."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]

    def __call__(self, s):
        return list(s.encode() if isinstance(s, str) else s)


def test_fallback_rendering_for_templates_without_tools():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "12C"},
                {"role": "tool", "tool_call_id": "c2", "content": "rain"}]
    out, tools = template_inputs(messages, TOOLS, "{{ messages }}", HERMES)
    listing = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in TOOLS))
    assert tools is None
    assert out == [{"role": "system", "content": "Be brief.\n\n" + listing}, messages[1],
                   {"role": "assistant", "content": HERMES.render("get_weather", {"city": "Oslo"})},
                   {"role": "user", "content": "<tool_response>\n12C\n</tool_response>\n"
                                               "<tool_response>\nrain\n</tool_response>"}]
    native = "{% for m in messages %}{{ m.tool_calls }}{% if m.role == 'tool' %}{% endif %}{% endfor %}{{ tools }}"
    assert template_inputs(messages, TOOLS, native, HERMES) == (messages, TOOLS)


def test_format_is_picked_from_the_template():
    assert pick_format("auto", "{{ '<tool_call>' }} {{ tools }}")[0] is HERMES
    assert "no tool support" in pick_format("auto", "{{ messages }}")[1]
    assert pick_format("hermes", None)[0] is HERMES


def _chat(**body):
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}).encode()


@pytest.mark.parametrize(("body", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice.function.name"),
    ({"tool_choice": {"type": "function"}, "tools": TOOLS}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters"),
    ({"tools": [TOOLS[1], TOOLS[1]]}, "tools[1].function.name"),
    ({"messages": [{"role": "tool", "content": "r"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function"}]}]},
     "messages[0].tool_calls[0].function"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{x"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "a", "tool_calls": []}]}, "messages[0].tool_calls"),
])
def test_bad_tool_fields_are_400_naming_them(body, param):
    with pytest.raises(ApiError) as info:
        parse_chat_request(_chat(**body))
    assert (info.value.status, info.value.param) == (400, param), info.value.message


def test_tool_choice_semantics():
    assert tool_request(None, None, None).mode == "none"
    assert tool_request(TOOLS, None, None).mode == "auto"
    none = tool_request(TOOLS, "none", None)
    assert not none.parses_calls and none.template_tools() == TOOLS  # offered, not parsed (vLLM's default)
    named = tool_request(TOOLS, {"type": "function", "function": {"name": "now"}}, False)
    assert [t.name for t in named.forced] == ["now"] and not named.parallel


def test_round_trip_renders_with_smollm2s_template():
    """SmolLM2's template concatenates `content` and knows no tools: it refused content None with a 500-
    looking TypeError before; the fallback renders the whole round trip (the default model's template)."""
    from kvrelay.frontend.tokenizer import Tokenizer
    from tests.models.smollm2 import model_dir

    tok = Tokenizer(model_dir())
    source = tok.template_source(tools=True)
    assert source is not None and "tools" not in source
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "12C"}]
    out, tools = template_inputs(messages, TOOLS, source, pick_format("auto", source)[0])
    text = tok.apply_chat_template(out, tools=tools)
    listing = "\n".join(json.dumps(t) for t in TOOLS)
    assert text == ("<|im_start|>system\n" + TOOLS_PROMPT.format(tools=listing) + "<|im_end|>\n"
                    "<|im_start|>user\nWeather in Oslo?<|im_end|>\n"
                    '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                    "</tool_call><|im_end|>\n"
                    "<|im_start|>user\n<tool_response>\n12C\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
