"""The planner's HTTP endpoint: `GET /status` (JSON), `POST /set` (JSON object of settings; 400 with an
OpenAI-style error naming the bad one), `GET /metrics` (kvrelay_planner_*). Bound to --planner-host.

With an API key every endpoint needs `Authorization: Bearer <key>` (401 otherwise): `/set` starts and
stops workers. `/set` cannot raise a bound above the configured one (Policy.update); every accepted
change is logged with the caller's address, what changed and from what.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Iterator

import uvicorn
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvrelay.planner.loop import Planner
from kvrelay.runtime.metrics import CONTENT_TYPE_LATEST, render

log = logging.getLogger("kvrelay.planner")


def _error(message: str, status: int = 400, code: str = "invalid_setting") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": code}}, status_code=status)


class _UvicornServer(uvicorn.Server):
    """The owning process handles SIGINT/SIGTERM (it stops the planner, then `close`s this server).
    uvicorn's own handlers (installed in `serve`, main thread only) would replace the process's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ControlServer:
    def __init__(self, planner: Planner, registry: CollectorRegistry, host: str, port: int, api_key: str = ""):
        self.planner, self.registry, self.host, self.port = planner, registry, host, port
        self.api_key = api_key
        self.app = Starlette(routes=[Route("/status", self.status, methods=["GET"]),
                                     Route("/set", self.set, methods=["POST"]),
                                     Route("/metrics", self.metrics, methods=["GET"])])
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    def _denied(self, request: Request) -> JSONResponse | None:
        if not self.api_key:
            return None
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if hmac.compare_digest(token.encode(), self.api_key.encode()):
            return None
        return _error("Incorrect API key provided.", 401, "invalid_api_key")

    async def status(self, request: Request) -> JSONResponse:
        return self._denied(request) or JSONResponse(self.planner.status())

    async def set(self, request: Request) -> JSONResponse:
        denied = self._denied(request)
        if denied is not None:
            log.warning("planner /set refused: no valid API key from %s", _who(request))
            return denied
        try:
            changes = json.loads(await request.body())
        except ValueError:
            return _error("body must be a JSON object")
        if not isinstance(changes, dict) or not changes:
            return _error("body must be a non-empty JSON object of settings")
        before = self.planner.policy.settings()
        try:
            self.planner.policy.update(changes)
        except ValueError as e:
            log.warning("planner /set from %s refused (%s): %s", _who(request), e, changes)
            return _error(str(e))
        after = self.planner.policy.settings()
        log.warning("planner settings changed by %s: %s", _who(request),
                    ", ".join(f"{k} {before[k]} -> {after[k]}" for k in after if before[k] != after[k]) or "no change")
        return JSONResponse(after)

    async def metrics(self, request: Request) -> Response:
        return self._denied(request) or Response(render(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def start(self) -> int:
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", lifespan="off")
        self._server = _UvicornServer(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task


def _who(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "unknown"
