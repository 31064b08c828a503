"""Responses API bodies: the `response` object, its output items, usage, and the SSE framing of its
stream events. Shaped as the `openai` client's types (`openai.types.responses`: `Response`,
`ResponseOutputMessage`, `ResponseFunctionToolCall`, `ResponseUsage`, the `Response*Event`s); tests
parse them with it.

Not the chat/completions bodies: those are openai_responses.py (an older name for "OpenAI response
bodies", unrelated to this API).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
from msgspec import Struct

from kvrelay.frontend.openai_responses import line_safe
from kvrelay.frontend.openai_schema import ApiError


class OutputText(Struct):
    text: str
    type: str = "output_text"
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(Struct):
    id: str  # msg_...
    content: list[OutputText]
    status: str  # in_progress | completed | incomplete
    type: str = "message"
    role: str = "assistant"


class FunctionCallItem(Struct):
    id: str  # fc_...: the item's id
    call_id: str  # call_...: what the client's function_call_output names
    name: str
    arguments: str  # the model's JSON text of the arguments object
    status: str
    type: str = "function_call"


OutputItem = OutputMessage | FunctionCallItem


class InputTokensDetails(Struct):
    cached_tokens: int = 0  # prompt tokens served from the worker's KV prefix cache
    # OpenAI counts tokens written under explicit prompt caching (prompt_cache_options); there is none
    # here (prefix caching is automatic and not billed), so none are written in that sense.
    cache_write_tokens: int = 0


class OutputTokensDetails(Struct):
    reasoning_tokens: int = 0  # the models served here write no separate reasoning


class ResponseUsage(Struct):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


def response_usage(input_tokens: int, output_tokens: int, cached_tokens: int) -> ResponseUsage:
    return ResponseUsage(input_tokens, InputTokensDetails(cached_tokens), output_tokens, OutputTokensDetails(),
                         input_tokens + output_tokens)


class IncompleteDetails(Struct):
    reason: str  # max_output_tokens


class ResponseError(Struct):
    code: str  # server_error | rate_limit_exceeded (the codes OpenAI's `ResponseError` allows)
    message: str


class Response(Struct, kw_only=True):
    """The `response` object; `output` is a list of `OutputItem`s (typed Any: msgspec encodes by value)."""

    id: str  # resp_...
    object: str = "response"
    created_at: int
    status: str  # in_progress | completed | incomplete | failed
    background: bool = False
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    model: str
    output: list[Any]
    parallel_tool_calls: bool
    previous_response_id: None = None
    reasoning: dict[str, None] = msgspec.field(default_factory=lambda: {"effort": None, "summary": None})
    store: bool = False  # nothing is ever stored here
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_p: float
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    completed_at: int | None = None


def new_item_id(kind: str) -> str:
    """`resp_...`, `msg_...`, `fc_...` (OpenAI's prefixes)."""
    return f"{kind}_{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


_encoder = msgspec.json.Encoder()


def event_sse(event: dict[str, Any]) -> bytes:
    """One stream event as SSE: `event: <type>` and its JSON (OpenAI names each event; no `[DONE]`)."""
    return b"event: " + event["type"].encode() + b"\ndata: " + line_safe(_encoder.encode(event)) + b"\n\n"


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def failure_code(e: ApiError) -> str:
    """`response.error.code` of a failed response: OpenAI's client allows a fixed set; a full server is
    `rate_limit_exceeded`, anything else `server_error` (the `error` event before it carries our own code)."""
    return "rate_limit_exceeded" if e.status == 429 else "server_error"
