"""ResponseBuilder.sse: the pre-rendered per-token SSE bytes are exactly the encoded chunk Structs."""

from __future__ import annotations

from types import SimpleNamespace

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
