"""The request-plane server: named endpoints, each an async generator of responses.

    server = RpcServer()
    server.add_endpoint("generate", handler, request_type=GenerateRequest)
    address = await server.start()          # "127.0.0.1:<port>"

A handler is an async generator function, `async def handler(request) -> AsyncGenerator[Struct, None]`
(the server closes it with `aclose()`). Per call the server runs it in its own task. Invariants:
- A `Cancel` from the client, or the client's connection closing, cancels the handler's task: the
  handler sees `CancelledError` at its current await and its finally blocks run.
- Every call ends with exactly one of: `End` (handler returned), `Fail` (handler raised, endpoint
  unknown, bad request, server shutdown), or nothing (the client cancelled; it is not listening).
- A malformed or oversized frame drops that one connection; other connections are unaffected.
- With a `token`, a connection runs nothing until its first frame is `Auth` with that token; a call
  before it is answered `Fail("Unauthorized")` and the connection is dropped. A wrong `Auth` drops the
  connection too (calls already in the same read are answered `Unauthorized` first): one guess per TCP
  connection, never thousands on one. Refusals are logged, at most one line a minute per peer host.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import msgspec

from kvrelay.runtime.log import Throttled
from kvrelay.runtime.rpc.conn import FramedProtocol
from kvrelay.runtime.rpc.errors import FailKind, RpcCancelled
from kvrelay.runtime.rpc.frames import (
    DEFAULT_MAX_FRAME,
    Auth,
    Cancel,
    End,
    Fail,
    Item,
    ServerInbound,
    _CallIn,
)
from kvrelay.runtime.wire import decoder

log = logging.getLogger(__name__)

Handler = Callable[[Any], AsyncGenerator[Any, None]]  # closed with aclose(): its finally blocks run


class _Endpoint(msgspec.Struct):
    handler: Handler
    request_type: Any  # None: the handler receives the raw msgpack bytes


class _ServerConnection(FramedProtocol):
    inbound = ServerInbound

    def __init__(self, server: RpcServer):
        super().__init__(server.max_frame)
        self._server = server
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._authorized = not server.token
        self._auth_failed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server._connections.add(self)

    def on_frame(self, frame: Any) -> None:
        if isinstance(frame, Auth):
            if not self._server.token or hmac.compare_digest(frame.token.encode(), self._server.token.encode()):
                self._authorized = not self._auth_failed
                return
            self._authorized, self._auth_failed = False, True
            self._server.refused(self._peer(), "a wrong internal token")
            # Closed once this read's frames are handled: a call that came with the Auth learns why.
            asyncio.get_running_loop().call_soon(self._close)
            return
        if not self._authorized:
            if not self._auth_failed:
                self._server.refused(self._peer(), "a call without the internal token")
            if isinstance(frame, _CallIn):
                self.send(Fail(frame.id, FailKind.UNAUTHORIZED, "this port requires the internal token"))
                self._flush()
            if self.transport is not None:
                self.transport.close()  # after the Fail is written
            return
        if isinstance(frame, Cancel):
            task = self._tasks.get(frame.id)
            if task is not None:
                task.cancel()
            return
        self._start_call(frame)

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if peer else "unknown"

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()  # after what was sent is written

    def _start_call(self, call: _CallIn) -> None:
        endpoint = self._server._endpoints.get(call.endpoint)
        if endpoint is None:
            self.send(Fail(call.id, FailKind.ENDPOINT_NOT_FOUND, f"no endpoint named {call.endpoint!r}"))
            return
        if call.id in self._tasks:
            log.warning("duplicate call id %d; dropping connection", call.id)
            self.abort()
            return
        try:
            request = (bytes(call.payload) if endpoint.request_type is None
                       else decoder(endpoint.request_type).decode(call.payload))
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.send(Fail(call.id, FailKind.INVALID_REQUEST, str(e)))
            return
        task = asyncio.get_running_loop().create_task(self._run(call.id, endpoint.handler, request))
        self._tasks[call.id] = task

    async def _run(self, call_id: int, handler: Handler, request: Any) -> None:
        try:
            async with contextlib.aclosing(handler(request)) as responses:
                async for item in responses:
                    self.send(Item(call_id, item))
                    await self.wait_writable()
            self.send(End(call_id))
        except asyncio.CancelledError:
            if self._server._closing:
                self.send(Fail(call_id, FailKind.CANCELLED, "server shutting down"))
            # Otherwise the client cancelled (or left): nobody is listening for a reply.
        except RpcCancelled as e:
            self.send(Fail(call_id, FailKind.CANCELLED, str(e)))
        except Exception as e:  # the handler's failure is the caller's error, never the server's
            log.debug("handler for call %d raised", call_id, exc_info=True)
            self.send(Fail(call_id, type(e).__name__, str(e)))
        finally:
            self._tasks.pop(call_id, None)

    def on_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        for task in self._tasks.values():
            task.cancel()

    async def shutdown(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._flush()
        if self.transport is not None:
            self.transport.close()


class RpcServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, max_frame: int = DEFAULT_MAX_FRAME, token: str = ""):
        self.host, self.port, self.max_frame, self.token = host, port, max_frame, token
        self._endpoints: dict[str, _Endpoint] = {}
        self._connections: set[_ServerConnection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._closing = False
        self.refusals = 0  # connections refused for a missing or wrong token
        self._refusal_log = Throttled(log)

    def refused(self, peer: str, what: str) -> None:
        self.refusals += 1
        self._refusal_log.warning(peer, "RPC port %s refused %s from %s (connection closed)", self.address, what,
                                  peer)

    def add_endpoint(self, name: str, handler: Handler, request_type: Any = None) -> None:
        if name in self._endpoints:
            raise ValueError(f"endpoint {name!r} already registered")
        self._endpoints[name] = _Endpoint(handler, request_type)

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ServerConnection(self), self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.address

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def active_calls(self) -> int:
        return sum(len(c._tasks) for c in self._connections)

    async def close(self) -> None:
        """Stop accepting, fail in-flight calls with `Cancelled` so clients can retry elsewhere."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(c.shutdown() for c in list(self._connections)), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
