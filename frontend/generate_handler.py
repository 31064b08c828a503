"""The hot path: POST /v1/chat/completions, /v1/completions and /v1/responses as plain ASGI.

Starlette serves every other route; these two skip its middleware stack and the task group behind
each StreamingResponse, which cost more CPU per request than the rest of the frontend together
(measured with `python -m kvrelay.perf.frontend_bench`). Contract kept: OpenAI error JSON for every
failure, no stack trace to a client, and a client that disconnects cancels the generation (one watcher
task per request reads `http.disconnect`).

Draining (docs/ARCHITECTURE.md "Shutdown and readiness"): after `drain()` starts, new requests get a 503
`draining`; requests in flight run on until `expire()`, which ends each stream with an SSE error event
and `[DONE]` (a non-streamed request gets the same error as JSON). `idle` is set while none is in flight.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kvrelay.frontend.access_log import SCOPE_KEY
from kvrelay.frontend.choices import ChoicesBuilder, run_choices
from kvrelay.frontend.config import FrontendConfig
from kvrelay.frontend.metrics import FrontendMetrics
from kvrelay.frontend.openai_responses import encode, new_id
from kvrelay.frontend.openai_schema import ApiError
from kvrelay.frontend.pipeline import Piece, Pipeline, Prepared
from kvrelay.frontend.responses import ResponseBuilder

log = logging.getLogger(__name__)

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class ReplyBuilder(Protocol):
    """One request's reply, whole or streamed (responses.py's chat/completions builder, and
    responses_api_builder.py's for the Responses API): the stream's framing is the builder's."""

    def head_sse(self) -> bytes: ...
    def sse(self, piece: Piece) -> bytes: ...
    def tail_sse(self) -> bytes: ...
    def error_sse(self, e: ApiError) -> bytes: ...
    async def collect(self, pieces: AsyncIterator[Piece]) -> Any: ...


async def _prepare(pipeline: Pipeline, req: Any, request_id: str, arrival: float) -> Prepared:
    return await pipeline.prepare(req, request_id, arrival)


@dataclass(frozen=True)
class GenerateRoute:
    """A generate endpoint: `endpoint` (the metrics label), how its body is parsed, prepared (tokenized,
    checked) and answered."""

    endpoint: str
    parse: Callable[[bytes], Any]
    builder: Callable[[Prepared, Any], ReplyBuilder]
    prepare: Callable[[Pipeline, Any, str, float], Awaitable[Prepared]] = _prepare


class GenerateHandler:
    def __init__(self, cfg: FrontendConfig, pipeline: Pipeline, metrics: FrontendMetrics):
        self.cfg, self.pipeline, self.metrics = cfg, pipeline, metrics
        self.draining = False
        self.expired = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.active = 0
        self._work: set[asyncio.Future] = set()  # the generation of each request in flight

    async def __call__(self, scope: dict, receive: Callable, send: Callable, route: GenerateRoute) -> None:
        arrival = time.monotonic()  # TTFT and queue time start here, before the body is read
        self.metrics.inflight.inc()
        self.active += 1
        self.idle.clear()
        status = 500
        try:
            status = await self._serve(scope, receive, send, route, arrival)
        finally:
            self.active -= 1
            if not self.active:
                self.idle.set()
            self.metrics.inflight.dec()
            self.metrics.requests.labels(route.endpoint, str(status)).inc()

    def expire(self) -> None:
        """The drain timeout passed: end every request still in flight (each with the draining error)."""
        self.expired = True
        for work in list(self._work):
            work.cancel()

    async def _serve(self, scope: dict, receive: Callable, send: Callable, route: GenerateRoute,
                     arrival: float) -> int:
        try:
            self._authorize(scope)
            if self.draining:
                raise _DRAINING
            body = await self._body(receive)
            if body is None:
                return 499  # the client left before sending its request
            req = route.parse(body)
            prepared = await route.prepare(self.pipeline, req, new_id("req"), arrival)
            scope[SCOPE_KEY] = prepared  # for the access log (access_log.py): model, tokens, TTFT
        except ApiError as e:
            return await _send_error(send, e)
        except Exception:
            log.exception("unexpected error preparing %s", route.endpoint)
            return await _send_error(send, ApiError.internal())
        if self.expired:  # it was still being prepared when the drain timed out
            return await _send_error(send, _DRAINING)
        builder = route.builder(prepared, req)
        if req.stream:
            work = self._stream(send, prepared, builder)
        else:
            work = self._whole(send, prepared, builder)
        return await _until_disconnect(work, receive, self._work)

    async def _stream(self, send: Callable, prepared, builder: ReplyBuilder) -> int:
        """Status before streaming: the first output (the request routed, admitted by a worker and
        prefilled) is awaited before the 200 goes out, so a refusal (full queues, no worker, draining) is
        its own status with `Retry-After`, never an error event inside a 200. An error after the first
        byte ends the stream with an SSE error event (always with a `code`) and is counted under its
        own status: the 200 was sent, but the request failed."""
        pieces = self._pieces(prepared)
        try:
            first = await pieces.__anext__()
        except ApiError as e:
            return await _send_error(send, e)
        except StopAsyncIteration:  # the pipeline always ends with a finished piece; defensive
            log.error("request %s: the pipeline ended without output", prepared.request.request_id)
            return await _send_error(send, ApiError.internal())
        except asyncio.CancelledError:
            if not self.expired:
                raise
            return await _send_error(send, _DRAINING)
        except Exception:
            log.exception("unexpected error before streaming")
            return await _send_error(send, ApiError.internal())
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        chunks = [builder.head_sse()]
        status = 200
        try:
            piece = first
            while True:
                chunks.append(builder.sse(piece))
                if piece.finish_reason is not None and not piece.more:
                    break
                # the last piece goes out with the tail: one write
                await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
                chunks = []
                piece = await pieces.__anext__()
            chunks.append(builder.tail_sse())
        except StopAsyncIteration:
            chunks.append(builder.tail_sse())
        except ApiError as e:
            if e.code is None:  # after the 200 the code is all a client can branch on: never null
                e = ApiError(e.status, e.message, e.type, e.param, code="request_failed")
            chunks.append(builder.error_sse(e))
            status = e.status
        except asyncio.CancelledError:
            if not self.expired:
                raise
            chunks.append(builder.error_sse(_DRAINING))  # ended by the drain timeout: the client learns why
            status = _DRAINING.status
        except Exception:
            log.exception("unexpected error while streaming")
            chunks.append(builder.error_sse(ApiError.internal()))
            status = 500
        finally:
            await pieces.aclose()
        await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": False})
        return status

    async def _whole(self, send: Callable, prepared, builder: ReplyBuilder) -> int:
        try:
            body = encode(await builder.collect(self._pieces(prepared)))
        except ApiError as e:
            return await _send_error(send, e)
        except asyncio.CancelledError:
            if not self.expired:
                raise
            return await _send_error(send, _DRAINING)
        except Exception:
            log.exception("unexpected error generating")
            return await _send_error(send, ApiError.internal())
        await send({"type": "http.response.start", "status": 200, "headers": _JSON})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return 200

    def _pieces(self, prepared: Prepared) -> AsyncGenerator[Piece, None]:
        return run_choices(self.pipeline, prepared) if prepared.n > 1 else self.pipeline.run(prepared)

    def _authorize(self, scope: dict) -> None:
        if not self.cfg.api_key:
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.cfg.api_key.encode()):
            raise ApiError.invalid_api_key()

    async def _body(self, receive: Callable) -> bytes | None:
        limit, body = self.cfg.max_request_bytes, bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body += msg.get("body", b"")
            if len(body) > limit:
                raise ApiError(413, f"Request body exceeds {limit} bytes.", code="request_too_large")
            if not msg.get("more_body", False):
                return bytes(body)


_DRAINING = ApiError(503, "The server is shutting down; retry on another instance.",
                     type="service_unavailable_error", code="draining", retry_after=1)


async def _send_error(send: Callable, e: ApiError) -> int:
    await send({"type": "http.response.start", "status": e.status, "headers": e.headers()})
    await send({"type": "http.response.body", "body": e.body(), "more_body": False})
    return e.status


def chat_builder(endpoint: str) -> Callable[[Prepared, Any], ReplyBuilder]:
    return lambda prepared, req: (ChoicesBuilder if prepared.n > 1 else ResponseBuilder)(endpoint, prepared, req)


async def _until_disconnect(work: Any, receive: Callable, active: set[asyncio.Future]) -> int:
    """Run `work` (listed in `active` meanwhile); if the client disconnects first, cancel it (the
    worker-side request goes with it)."""
    task = asyncio.ensure_future(work)
    active.add(task)
    task.add_done_callback(active.discard)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done():  # cancelled because the client left, not because we are
            return 499
        raise
    finally:
        watcher.cancel()
