"""The planner's HTTP endpoint: `GET /status` (JSON), `POST /set` (JSON object of settings; 400 with an
OpenAI-style error naming the bad one), `GET /metrics` (kvrelay_planner_*). Bound to --planner-host."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator

import uvicorn
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvrelay.planner.loop import Planner
from kvrelay.runtime.metrics import CONTENT_TYPE_LATEST, render


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": status}},
                        status_code=status)


class _UvicornServer(uvicorn.Server):
    """The owning process handles SIGINT/SIGTERM (it stops the planner, then `close`s this server).
    uvicorn's own handlers (installed in `serve`, main thread only) would replace the process's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ControlServer:
    def __init__(self, planner: Planner, registry: CollectorRegistry, host: str, port: int):
        self.planner, self.registry, self.host, self.port = planner, registry, host, port
        self.app = Starlette(routes=[Route("/status", self.status, methods=["GET"]),
                                     Route("/set", self.set, methods=["POST"]),
                                     Route("/metrics", self.metrics, methods=["GET"])])
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    async def status(self, _: Request) -> JSONResponse:
        return JSONResponse(self.planner.status())

    async def set(self, request: Request) -> JSONResponse:
        try:
            changes = json.loads(await request.body())
        except ValueError:
            return _error("body must be a JSON object")
        if not isinstance(changes, dict) or not changes:
            return _error("body must be a non-empty JSON object of settings")
        try:
            self.planner.policy.update(changes)
        except ValueError as e:
            return _error(str(e))
        return JSONResponse(self.planner.policy.settings())

    async def metrics(self, _: Request) -> Response:
        return Response(render(self.registry), media_type=CONTENT_TYPE_LATEST)

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
