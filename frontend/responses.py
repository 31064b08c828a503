"""Turning pipeline `Piece`s into OpenAI response bodies, streamed or whole (see openai_responses.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from kvrelay.frontend.openai_responses import (
    SSE_DONE,
    ChatChunker,
    CompletionChunker,
    FunctionCall,
    FunctionDelta,
    ToolCall,
    ToolCallDelta,
    chat_completion,
    chat_logprobs,
    completion,
    completion_logprobs,
    encode,
    sse,
    usage,
)
from kvrelay.frontend.openai_schema import ApiError
from kvrelay.frontend.pipeline import Piece, Prepared
from kvrelay.frontend.tool_call_stream import CallDelta, Event, ToolCallStream, parse_tool_calls
from kvrelay.workers.api.messages import TopLogprobs


class ResponseBuilder:
    def __init__(self, endpoint: str, prepared: Prepared, req: Any):
        self.chat = endpoint == "chat"
        self.p = prepared
        self.include_usage = req.include_usage
        self.want_logprobs = req.wants_logprobs
        self.chunker: ChatChunker | CompletionChunker = (
            ChatChunker if self.chat else CompletionChunker)(prepared.model, self.include_usage)
        self._offset = 0  # characters of completion text emitted so far (completions' text_offset)
        self._text_event: tuple[bytes, bytes] | None = None  # a text chunk's SSE bytes around its text
        # Tool calls are read from the text as it streams (tool_call_stream.py); None: plain text.
        self._calls: ToolCallStream | None = (ToolCallStream(prepared.tool_format, prepared.max_tool_calls)
                                              if self.chat and prepared.tool_format is not None else None)

    def _logprobs(self, piece: Piece):
        if not self.want_logprobs or piece.logprobs is None:
            return None
        tok = self.p.tokenizer
        n = min(len(piece.token_ids), len(piece.logprobs))
        render = tok.token_bytes if self.chat else tok.token_str
        top = None
        if piece.top_logprobs is not None:  # the worker sends one per token when the request asked
            top = [list(zip(map(render, t.token_ids), t.logprobs, strict=True)) for t in piece.top_logprobs[:n]]
        if self.chat:
            return chat_logprobs([tok.token_bytes(t) for t in piece.token_ids[:n]], piece.logprobs[:n], top)
        return completion_logprobs([tok.token_str(t) for t in piece.token_ids[:n]], piece.logprobs[:n],
                                   self._offset, top)

    def head(self) -> list[Any]:
        return [self.chunker.role()] if isinstance(self.chunker, ChatChunker) else []

    def _text_chunk(self, text: str, logprobs: Any = None, finish_reason: str | None = None) -> Any:
        """A chunk carrying `text`: a chat delta or a completion choice."""
        if isinstance(self.chunker, ChatChunker):
            return self.chunker.content(text, logprobs, finish_reason)
        return self.chunker.text(text, logprobs, finish_reason)

    def _finish_reason(self, reason: str, calls: int) -> str:
        """A model that called tools and stopped finished with "tool_calls" (OpenAI's), except under a
        named tool_choice: "stop" there, as OpenAI's API and vLLM's server answer."""
        return "tool_calls" if calls and reason == "stop" and not self.p.named_tool_choice else reason

    def _call_chunks(self, piece: Piece, lp: Any, calls: ToolCallStream) -> list[Any]:
        assert isinstance(self.chunker, ChatChunker)  # only chat requests parse tool calls
        events: list[Event] = calls.feed(piece.text)
        if piece.finish_reason is not None:
            events += calls.finish()
        out = [self.chunker.content(e) if isinstance(e, str) else self.chunker.tool_call(_delta(e))
               for e in events]
        if lp is not None:  # the piece's logprobs ride on its first chunk (one of their own if none)
            if out:
                out[0].choices[0].logprobs = lp
            else:
                out.append(self.chunker.content("", lp))
        if piece.finish_reason is not None:
            out.append(self.chunker.content("", None, self._finish_reason(piece.finish_reason, calls.calls)))
        return out

    def chunks(self, piece: Piece) -> list[Any]:
        lp = self._logprobs(piece)
        if self._calls is not None:
            return self._call_chunks(piece, lp, self._calls)
        out = []
        if piece.text or lp is not None:
            out.append(self._text_chunk(piece.text, lp))
            self._offset += len(piece.text)
        if piece.finish_reason is not None:  # OpenAI ends with a chunk holding only the finish reason
            out.append(self._text_chunk("", None, piece.finish_reason))
        return out

    def head_sse(self) -> bytes:
        """What a stream starts with (GenerateHandler's streaming interface, shared with the Responses API's
        builder): the role chunk."""
        return b"".join([sse(c) for c in self.head()])

    def tail_sse(self) -> bytes:
        """What a finished stream ends with: the usage chunk (when asked) and `[DONE]`."""
        return b"".join([sse(c) for c in self.tail()]) + SSE_DONE

    def error_sse(self, e: ApiError) -> bytes:
        """A failure after the 200: the error's JSON as an event, then `[DONE]`."""
        return sse(e) + SSE_DONE

    def sse(self, piece: Piece) -> bytes:
        """`chunks(piece)` as SSE bytes. A plain text piece (the per-token case) is one JSON string
        encode between the pre-rendered bytes of this stream's text chunk, byte for byte what encoding
        the chunk would give (the chunks of one stream differ only in the text)."""
        if (piece.finish_reason is not None or not piece.text or self._calls is not None
                or (self.want_logprobs and piece.logprobs is not None)):
            return b"".join([sse(c) for c in self.chunks(piece)])
        if self._text_event is None:
            mark = "\x00kvrelay-text\x00"
            whole = sse(self._text_chunk(mark))
            before, after = whole.split(encode(mark))
            self._text_event = (before, after)
        self._offset += len(piece.text)
        before, after = self._text_event
        return before + encode(piece.text) + after

    def tail(self) -> list[Any]:
        if not self.include_usage:
            return []
        u = self.p.usage
        return [self.chunker.usage(usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens))]

    async def collect(self, pieces: AsyncIterator[Piece]) -> Any:
        texts: list[str] = []
        ids: list[int] = []
        lps: list[float] = []
        tops: list[TopLogprobs] | None = None
        finish = "stop"
        async for piece in pieces:
            texts.append(piece.text)
            ids += piece.token_ids
            lps += piece.logprobs or []
            if piece.top_logprobs is not None:
                tops = tops if tops is not None else []
                tops += piece.top_logprobs
            finish = piece.finish_reason or finish
        whole = Piece("".join(texts), ids, lps if self.want_logprobs else None, None, tops)
        lp = self._logprobs(whole) if self.want_logprobs else None
        u = self.p.usage
        body_usage = usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
        if self.chat and self.p.tool_format is not None:
            content, calls = parse_tool_calls(self.p.tool_format, whole.text, self.p.max_tool_calls)
            return chat_completion(self.p.model, content, self._finish_reason(finish, len(calls)), body_usage, lp,
                                   id=self.chunker.id,
                                   tool_calls=[ToolCall(c.id, FunctionCall(c.name, c.arguments)) for c in calls])
        if self.chat:
            return chat_completion(self.p.model, whole.text, finish, body_usage, lp, id=self.chunker.id)
        return completion(self.p.model, whole.text, finish, body_usage, lp, id=self.chunker.id)


def _delta(e: CallDelta) -> ToolCallDelta:
    if e.id is not None:
        return ToolCallDelta(e.index, FunctionDelta(name=e.name or "", arguments=e.arguments), id=e.id, type="function")
    return ToolCallDelta(e.index, FunctionDelta(arguments=e.arguments))
