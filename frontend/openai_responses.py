"""OpenAI response bodies: chat.completion, chat.completion.chunk, text_completion, usage, logprobs, SSE.

Shaped exactly as the `openai` client's types (tests parse them with it). Streaming conventions:
- chat: the first chunk's delta is {"role": "assistant", "content": ""}, then content deltas, then a
  chunk with an empty delta and `finish_reason`; completions: text chunks, then one with empty text and `finish_reason`.
- with stream_options.include_usage every chunk carries "usage": null and one extra chunk with
  "choices": [] and the usage comes last; without it the key is absent. Then `SSE_DONE`.
- finish_reason is "stop" (EOS, stop token or stop string), "length", or "tool_calls" (the model called
  tools and stopped).
- tool calls stream as `delta.tool_calls` chunks (one call per chunk: index, id, type and name first,
  then pieces of its arguments).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec
from msgspec import UNSET, Struct, UnsetType

from kvrelay.frontend.openai_schema import ApiError

MIN_LOGPROB = -9999.0  # OpenAI's floor; JSON has no -inf


class PromptTokensDetails(Struct):
    cached_tokens: int = 0


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens,
                 PromptTokensDetails(cached_tokens))


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(Struct):
    content: list[ChatTokenLogprob] | None


Alternatives = Sequence[tuple[Any, float]]  # one position's most likely tokens (bytes or str) and logprobs


def chat_logprobs(tokens: Sequence[bytes], logprobs: Sequence[float],
                  top: Sequence[Alternatives] | None = None) -> ChatLogprobs:
    """One entry per sampled token: its bytes (`Tokenizer.token_bytes`) and logprob, and with `top` its
    position's most likely tokens (as bytes), most likely first."""
    tops = top if top is not None else [()] * len(tokens)
    return ChatLogprobs([ChatTokenLogprob(b.decode("utf-8", errors="replace"), _lp(lp), list(b),
                                          [TopLogprob(a.decode("utf-8", errors="replace"), _lp(alp), list(a))
                                           for a, alp in alts])
                         for b, lp, alts in zip(tokens, logprobs, tops, strict=True)])


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float]
    text_offset: list[int]
    top_logprobs: list[dict[str, float]] | None


def completion_logprobs(tokens: Sequence[str], logprobs: Sequence[float], offset: int = 0,
                        top: Sequence[Alternatives] | None = None) -> CompletionLogprobs:
    """`text_offset` counts characters from `offset` (the text already sent in earlier chunks). Each
    `top_logprobs` dict holds the position's most likely tokens (`top`) and the sampled one, as vLLM's
    (OpenAI's legacy format: tokens with the same text share one key)."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    lps = [_lp(lp) for lp in logprobs]
    tops = top if top is not None else [()] * len(tokens)
    dicts = [{**{a: _lp(alp) for a, alp in alts if a != t}, t: lp}
             for t, lp, alts in zip(tokens, lps, tops, strict=True)]
    return CompletionLogprobs(list(tokens), lps, offsets, dicts)


class FunctionCall(Struct):
    name: str
    arguments: str  # JSON text


class ToolCall(Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class ChatMessageOut(Struct):
    content: str | None
    role: str = "assistant"
    tool_calls: list[ToolCall] | UnsetType = UNSET  # absent unless the model called tools
    refusal: None = None  # required (nullable) in OpenAI's schema, as vLLM writes it; never a refusal here


class ChatChoice(Struct):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str  # stop | length | tool_calls


class ChatCompletion(Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionDelta(Struct, omit_defaults=True):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class ToolCallDelta(Struct, omit_defaults=True):
    """A call's first delta has index, id, type and the name (arguments ""); later ones index and arguments."""

    index: int
    function: FunctionDelta
    id: str | UnsetType = UNSET
    type: str | UnsetType = UNSET


class ChatDelta(Struct, omit_defaults=True):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    # Absent without stream_options.include_usage; with it, null on every chunk but the last (choices []).
    usage: Usage | None | UnsetType = UNSET
    system_fingerprint: str | None = None


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None  # None on stream chunks before the last


class Completion(Struct, kw_only=True):
    """Both the non-streamed body and each streamed chunk (OpenAI uses object "text_completion" for both)."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None | UnsetType = UNSET
    system_fingerprint: str | None = None


def chat_completion(model: str, text: str | None, finish_reason: str, usage: Usage,
                    logprobs: ChatLogprobs | None = None, id: str | None = None,
                    tool_calls: list[ToolCall] | None = None) -> ChatCompletion:
    message = ChatMessageOut(text, tool_calls=tool_calls) if tool_calls else ChatMessageOut(text)
    return ChatCompletion(id=id or new_id("chatcmpl"), created=now(), model=model, usage=usage,
                          choices=[ChatChoice(0, message, logprobs, finish_reason)])


def completion(model: str, text: str, finish_reason: str, usage: Usage,
               logprobs: CompletionLogprobs | None = None, id: str | None = None) -> Completion:
    return Completion(id=id or new_id("cmpl"), created=now(), model=model, usage=usage,
                      choices=[CompletionChoice(0, text, logprobs, finish_reason)])


class ChatChunker:
    """The chunks of one streamed chat completion: same id, created and model on every chunk."""

    def __init__(self, model: str, include_usage: bool = False, id: str | None = None) -> None:
        self.id, self.model, self.created = id or new_id("chatcmpl"), model, now()
        self.index = 0  # the choice these chunks carry (choices.py sets it when n > 1)
        self._usage: None | UnsetType = None if include_usage else UNSET

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None | UnsetType) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def role(self) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(self.index, ChatDelta(role="assistant", content=""))], self._usage)

    def content(self, text: str, logprobs: ChatLogprobs | None = None,
                finish_reason: str | None = None) -> ChatCompletionChunk:
        delta = ChatDelta(content=text) if text or finish_reason is None else ChatDelta()
        return self._chunk([ChatChunkChoice(self.index, delta, logprobs, finish_reason)], self._usage)

    def tool_call(self, delta: ToolCallDelta, logprobs: ChatLogprobs | None = None) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(self.index, ChatDelta(tool_calls=[delta]), logprobs)], self._usage)

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)


class CompletionChunker:
    """The chunks of one streamed text completion."""

    def __init__(self, model: str, include_usage: bool = False, id: str | None = None) -> None:
        self.id, self.model, self.created = id or new_id("cmpl"), model, now()
        self.index = 0
        self._usage: None | UnsetType = None if include_usage else UNSET

    def text(self, text: str, logprobs: CompletionLogprobs | None = None,
             finish_reason: str | None = None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, usage=self._usage,
                          choices=[CompletionChoice(self.index, text, logprobs, finish_reason)])

    def usage(self, usage: Usage) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)


def new_id(kind: str) -> str:
    """`chatcmpl-...` / `cmpl-...`."""
    return f"{kind}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


_encoder = msgspec.json.Encoder()
# Characters JSON may carry raw in a string but that line-splitting clients take for line ends (Python's
# str.splitlines, which httpx's `aiter_lines` uses: a generated U+2028 cut an SSE event in two for such a
# client): sent escaped. Their UTF-8 bytes occur only inside JSON strings, so replacing them is exact.
_LINE_ENDS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"), (b"\xc2\x85", b"\\u0085"))


def line_safe(payload: bytes) -> bytes:
    if b"\xe2\x80" in payload or b"\xc2\x85" in payload:
        for raw, escaped in _LINE_ENDS:
            payload = payload.replace(raw, escaped)
    return payload


def encode(obj: Any) -> bytes:
    """JSON of `obj`, with no character a client could take for a line end (it goes into SSE events)."""
    return line_safe(_encoder.encode(obj))


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON (an ApiError becomes its error body)."""
    payload = line_safe(obj.body()) if isinstance(obj, ApiError) else encode(obj)
    return b"data: " + payload + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def _lp(x: float) -> float:
    return MIN_LOGPROB if math.isnan(x) or x < MIN_LOGPROB else float(x)
