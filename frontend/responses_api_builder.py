"""Pipeline `Piece`s -> a Responses API reply: the `response` object, or its stream of events.

Stream order (each event with a `sequence_number` from 0): `response.created`, `response.in_progress`,
then per output item `response.output_item.added`, (`response.content_part.added`,
`response.output_text.delta`..., `response.output_text.done`, `response.content_part.done` for text |
`response.function_call_arguments.delta`..., `response.function_call_arguments.done` for a call),
`response.output_item.done`; last `response.completed`, or `response.incomplete` when the output hit
max_output_tokens (OpenAI's event for that status). A failure after the stream began is an `error`
event (our error code, never null) then `response.failed` (the response with `status: failed` and
`error`): the chat path's convention, in this API's events. No `data: [DONE]`: OpenAI sends none here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from kvrelay.frontend.openai_schema import ApiError
from kvrelay.frontend.pipeline import Piece, Prepared
from kvrelay.frontend.responses_api_body import (
    IncompleteDetails,
    Response,
    ResponseError,
    event_sse,
    failure_code,
    new_item_id,
    now,
    response_usage,
)
from kvrelay.frontend.responses_api_items import Events, OutputItems
from kvrelay.frontend.responses_api_request import ResponsesRequest
from kvrelay.frontend.tool_call_stream import Event, ToolCallStream


class ResponsesBuilder:
    def __init__(self, prepared: Prepared, req: ResponsesRequest):
        self.p, self.req = prepared, req
        self.id, self.created_at = new_item_id("resp"), now()
        self.items = OutputItems()
        self._calls = (ToolCallStream(prepared.tool_format, prepared.max_tool_calls)
                       if prepared.tool_format is not None else None)
        self._sequence = 0
        self._finish: str | None = None  # the pipeline's finish reason, once the last piece came

    def response(self, status: str, output: list[Any], error: ResponseError | None = None) -> Response:
        """The `response` object with the request's parameters echoed as OpenAI does (sampling values as
        applied: the model's generation_config defaults included)."""
        req, sampling, u = self.req, self.p.request.sampling, self.p.usage
        ended = status in ("completed", "incomplete")
        fmt = req.text.format if req.text is not None and req.text.format is not None else {"type": "text"}
        return Response(
            id=self.id, created_at=self.created_at, status=status, error=error,
            incomplete_details=IncompleteDetails("max_output_tokens") if status == "incomplete" else None,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens, metadata=req.metadata or {},
            model=self.p.model, output=output,
            parallel_tool_calls=req.parallel_tool_calls is not False, temperature=sampling.temperature,
            text={"format": fmt}, tool_choice=req.tool_choice if req.tool_choice is not None else "auto",
            tools=req.tools or [], top_p=sampling.top_p, user=req.user,
            usage=response_usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens) if ended else None,
            completed_at=now() if status == "completed" else None)

    def _status(self) -> str:
        return "incomplete" if self._finish == "length" else "completed"

    def _events(self, piece: Piece) -> Events:
        model_events: list[Event] = [piece.text]
        if self._calls is not None:
            model_events = self._calls.feed(piece.text)
            if piece.finish_reason is not None:
                model_events += self._calls.finish()
        out = self.items.feed(model_events)
        if piece.finish_reason is not None:
            self._finish = piece.finish_reason
            out += self.items.finish(truncated=piece.finish_reason == "length")
        return out

    def _sse(self, events: Events) -> bytes:
        chunks = []
        for e in events:
            e["sequence_number"] = self._sequence
            self._sequence += 1
            chunks.append(event_sse(e))
        return b"".join(chunks)

    # -- the interface GenerateHandler streams with -----------------------------------------------------
    def head_sse(self) -> bytes:
        return self._sse([{"type": "response.created", "response": self.response("in_progress", [])},
                          {"type": "response.in_progress", "response": self.response("in_progress", [])}])

    def sse(self, piece: Piece) -> bytes:
        return self._sse(self._events(piece))

    def tail_sse(self) -> bytes:
        status = self._status()
        return self._sse([{"type": f"response.{status}", "response": self.response(status, self.items.snapshot())}])

    def error_sse(self, e: ApiError) -> bytes:
        failed = self.response("failed", self.items.snapshot(), ResponseError(failure_code(e), e.message))
        return self._sse([{"type": "error", "code": e.code, "message": e.message, "param": e.param},
                          {"type": "response.failed", "response": failed}])

    async def collect(self, pieces: AsyncIterator[Piece]) -> Response:
        """The whole reply: the text read for calls in one go (as the chat path's non-streamed reply)."""
        texts: list[str] = []
        finish = "stop"
        async for piece in pieces:
            texts.append(piece.text)
            finish = piece.finish_reason or finish
        self._events(Piece("".join(texts), [], None, finish))
        return self.response(self._status(), self.items.snapshot())
