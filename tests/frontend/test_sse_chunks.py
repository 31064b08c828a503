"""ResponseBuilder.sse: the pre-rendered per-token SSE bytes are exactly the encoded chunk Structs."""

from __future__ import annotations

from types import SimpleNamespace

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrelay.frontend.openai_responses import sse
from kvrelay.frontend.pipeline import Piece
from kvrelay.frontend.responses import ResponseBuilder


def _builder(endpoint: str, include_usage: bool, logprobs: bool = False) -> ResponseBuilder:
    prepared = SimpleNamespace(model='m"odel\u2028', tokenizer=None, usage=None, tool_format=None, max_tool_calls=None)
    req = SimpleNamespace(include_usage=include_usage, wants_logprobs=logprobs)
    return ResponseBuilder(endpoint, prepared, req)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("include_usage", [True, False])
@settings(max_examples=100, deadline=None)
@given(texts=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=5))
def test_fast_text_events_equal_encoded_structs(endpoint, include_usage, texts):
    builder = _builder(endpoint, include_usage)
    for text in texts:
        piece = Piece(text, [1], None)
        assert builder.sse(piece) == b"".join(sse(c) for c in builder.chunks(piece))


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_finish_and_empty_pieces_take_the_struct_path(endpoint):
    builder = _builder(endpoint, True)
    for piece in (Piece("", [1], None), Piece("end", [2], None, "stop"), Piece("", [3], None, "length")):
        assert builder.sse(piece) == b"".join(sse(c) for c in builder.chunks(piece))
    assert builder.sse(Piece("", [1], None)) == b""  # nothing to say: no event


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(["a", "\u2028", "\u2029", "\x85", "\x1c", "\u00e9", "\n"]), min_size=1))
def test_events_hold_no_character_a_line_splitting_client_ends_a_line_at(endpoint, text):
    """Generated text may contain U+2028/U+2029/U+0085, which JSON carries raw but `str.splitlines` (httpx's
    `aiter_lines`) takes for line ends: every event is one line per field, and decodes back to the text."""
    builder = _builder(endpoint, False)
    event = builder.sse(Piece(text, [1], None))
    lines = event.decode().splitlines()
    assert lines == [lines[0], ""] and lines[0].startswith("data: ")
    chunk = msgspec.json.decode(lines[0][6:])
    got = chunk["choices"][0]["delta"]["content"] if endpoint == "chat" else chunk["choices"][0]["text"]
    assert got == text
