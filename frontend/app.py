"""The OpenAI-compatible HTTP API (Starlette on uvicorn, uvloop in servers).

Routes: POST /v1/chat/completions, POST /v1/completions, POST /v1/responses, GET /v1/models, /health,
/ready, /metrics, /openapi.json.
Every error is OpenAI error JSON; no stack trace ever reaches a client. The three generate endpoints
are plain ASGI (`generate_handler.py`, the hot path); Starlette serves the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvrelay.frontend.access_log import AccessLog
from kvrelay.frontend.config import FrontendConfig
from kvrelay.frontend.generate_handler import GenerateHandler, GenerateRoute, chat_builder
from kvrelay.frontend.metrics import FrontendMetrics
from kvrelay.frontend.openai_schema import ApiError, parse_chat_request, parse_completion_request
from kvrelay.frontend.openapi import openapi_document
from kvrelay.frontend.peer_metrics import PeerMetrics
from kvrelay.frontend.pipeline import Pipeline
from kvrelay.frontend.responses_api_builder import ResponsesBuilder
from kvrelay.frontend.responses_api_request import parse_responses_request, prepare_responses
from kvrelay.frontend.service import FrontendService
from kvrelay.runtime.discovery import Discovery
from kvrelay.runtime.events import EventPlane
from kvrelay.runtime.metrics import CONTENT_TYPE_LATEST, render

log = logging.getLogger(__name__)

# Idle keep-alive connections stay open this long. It must exceed the clients' own pool expiry (httpx 5 s,
# aiohttp 15 s) and a load balancer's idle timeout (60 s is common): with uvicorn's default of 5 s a
# client reusing a connection the server was closing at that moment got a ReadError (planner benchmark).
KEEP_ALIVE_S = 65
ACCEPT_WAIT_S = 30.0  # the longest an extra HTTP process waits for every model to be routable before accepting


def _error(e: ApiError) -> Response:
    headers = {k.decode(): v.decode() for k, v in e.headers() if k != b"content-type"}
    return Response(e.body(), status_code=e.status, media_type="application/json", headers=headers)


class FrontendServer:
    def __init__(self, cfg: FrontendConfig, discovery: Discovery, events: EventPlane, internal_token: str = "",
                 http_group: tuple[str, int] = ("", 1)):
        """`http_group`: the id shared by the HTTP processes of one frontend (`--http-workers N`) and N;
        each then answers /metrics for all of them (peer_metrics.py)."""
        self.cfg = cfg
        self.service = FrontendService(cfg, discovery, events, internal_token=internal_token)
        group, size = http_group
        self.peer_metrics = PeerMetrics(events, cfg.namespace, group, self.service.frontend_id,
                                        self.service.registry, peers=size - 1) if group else None
        self.metrics = FrontendMetrics(self.service.registry)
        self.pipeline = Pipeline(self.service, self.metrics)
        self.app = self._build_app()
        self.generate = GenerateHandler(cfg, self.pipeline, self.metrics)
        self._uvicorn: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None
        self._stop_requested = False  # a stop signal came (an extra HTTP process then never starts accepting)
        self.port = cfg.http_port
        self._openapi: bytes | None = None
        self.draining = False  # set by drain(): /ready is 503 and new generate requests are refused

    def _build_app(self) -> Starlette:
        async def not_found(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)  # registered for HTTPException only
            response = _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)))
            response.headers.update(exc.headers or {})  # 405: Allow
            return response

        async def post_only(request: Request) -> Response:  # never reached: `asgi` serves POST itself
            raise HTTPException(405)

        return Starlette(routes=[
            *(Route(path, post_only, methods=["POST"]) for path in _GENERATE),  # other methods: 405
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ], exception_handlers={HTTPException: not_found})

    async def start(self, sock: socket.socket | None = None, accept_when_ready: bool = False) -> None:
        """Serve on `cfg.http_host:http_port`, or on `sock`, a listening socket shared with other HTTP
        processes of this frontend (they all accept from its one queue). Returns once accepting; by then
        the routers hold every worker discovery listed at start (bounded: FrontendService.start).
        `accept_when_ready` (the extra HTTP processes): also wait, up to ACCEPT_WAIT_S, until this
        process would route a request for every model, so a client that saw another process's /ready
        200 never lands on one that would answer 'no models' or 503 no_worker."""
        await self.service.start()
        if self.peer_metrics is not None:
            await self.peer_metrics.start()
        if accept_when_ready and sock is not None:
            if not await self._wait_routable(ACCEPT_WAIT_S):
                return  # stopped while waiting: never accept
        await self._serve(sock)

    async def _wait_routable(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Polled: readiness has many sources (discovery, model cards, load reports).
        while not (self.service.models() and not self.service.unready_models()):
            if self._stop_requested:
                return False
            if loop.time() > deadline:
                log.warning("HTTP process %d accepting after %.0f s although not every model is routable "
                            "here (%s)", os.getpid(), timeout,
                            "; ".join(f"{m}: {why}" for m, why in sorted(self.service.unready_models().items()))
                            or "no worker registered")
                return True
            await asyncio.sleep(0.05)
        log.info("HTTP process %d accepting: its routers see %d worker(s) serving %s", os.getpid(),
                 len(self.service.pool.instances), ", ".join(self.service.models()))
        return not self._stop_requested

    async def _serve(self, sock: socket.socket | None) -> None:
        app = AccessLog(self.asgi) if self.cfg.access_log else self.asgi
        config = uvicorn.Config(app, host=self.cfg.http_host, port=self.cfg.http_port, log_level="warning",
                                interface="asgi3", proxy_headers=False,
                                loop="none", lifespan="off", timeout_graceful_shutdown=5,
                                timeout_keep_alive=KEEP_ALIVE_S)
        self._uvicorn = _UvicornServer(config)
        self._task = asyncio.create_task(self._uvicorn.serve(sockets=[sock] if sock is not None else None))
        while not self._uvicorn.started:
            if self._task.done():  # e.g. the port is taken
                self._task.result()
                raise RuntimeError(f"HTTP server on {self.cfg.http_host}:{self.cfg.http_port} did not start")
            await asyncio.sleep(0.01)
        self.port = self._uvicorn.servers[0].sockets[0].getsockname()[1]

    def on_stop_signal(self, stop: asyncio.Event) -> None:
        """SIGINT/SIGTERM handler of the owning process: the first sets `stop` (the owner then calls
        `drain`); a second one ends what is still in flight now."""
        if stop.is_set():
            self.generate.expire()
        self._stop_requested = True
        stop.set()

    async def drain(self, timeout: float) -> None:
        """Stop taking work (/ready 503, new requests 503), let requests in flight finish for up to
        `timeout` seconds, then end the rest with an error event (streams) or a 503 (whole answers)."""
        self.draining = self.generate.draining = True
        log.info("draining: %d requests in flight, up to %.0f s; press Ctrl-C again to stop now",
                 self.generate.active, timeout)
        try:
            await asyncio.wait_for(self.generate.idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("drain timeout: ending %d requests still in flight", self.generate.active)
            self.generate.expire()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.generate.idle.wait(), 5.0)

    async def close(self) -> None:
        if self._uvicorn is not None and self._task is not None:
            self._uvicorn.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
        if self.peer_metrics is not None:
            await self.peer_metrics.close()
        await self.service.close()

    # -- routes -----------------------------------------------------------------------------------------
    async def asgi(self, scope: dict, receive, send) -> None:
        """The ASGI entry point: the generate endpoints take the plain-ASGI hot path."""
        if scope["type"] == "http" and scope["method"] == "POST":
            route = _GENERATE.get(scope["path"])
            if route is not None:
                await self.generate(scope, receive, send, route)
                return
        await self.app(scope, receive, send)

    def _authorized(self, request: Request) -> bool:
        if not self.cfg.api_key:
            return True
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        return hmac.compare_digest(token.encode(), self.cfg.api_key.encode())

    def _authorize(self, request: Request) -> None:
        if not self._authorized(request):
            raise ApiError.invalid_api_key()

    async def list_models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as e:
            return _error(e)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "kvrelay"} for m in self.service.models()]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """200 only when a request for every served model would be routed now (docs/ARCHITECTURE.md "Shutdown and
        readiness"). Model names and counts only for a caller holding the API key, when one is set."""
        models = self.service.models()
        unready = self.service.unready_models()
        if self.draining:
            reason = "draining"
        elif not models:
            reason = "no worker registered"
        elif unready:
            reason = "; ".join(f"{m}: {why}" for m, why in sorted(unready.items()))
        else:
            reason = ""
        body: dict = {"status": "not ready" if reason else "ready"}
        if self._authorized(request):
            if reason:
                body["reason"] = reason
            body.update(models=models, workers=len(self.service.pool.instances))
        return JSONResponse(body, status_code=503 if reason else 200)

    async def openapi(self, request: Request) -> Response:
        if self._openapi is None:
            self._openapi = msgspec.json.encode(openapi_document(_version()))
        return Response(self._openapi, media_type="application/json")

    async def prometheus(self, request: Request) -> Response:
        if not self._authorized(request):  # per-worker and per-model detail is not for anyone
            return _error(ApiError.invalid_api_key())
        body = await self.peer_metrics.render() if self.peer_metrics is not None else render(self.service.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)


class _UvicornServer(uvicorn.Server):
    """The owning process handles SIGINT/SIGTERM (drain first, then `close`). uvicorn's own handlers
    would start its shutdown at once and cancel every stream after `timeout_graceful_shutdown`."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvrelay")
    except PackageNotFoundError:
        return "0"


_GENERATE = {
    "/v1/chat/completions": GenerateRoute("chat", parse_chat_request, chat_builder("chat")),
    "/v1/completions": GenerateRoute("completions", parse_completion_request, chat_builder("completions")),
    "/v1/responses": GenerateRoute("responses", parse_responses_request, ResponsesBuilder, prepare_responses),
}
