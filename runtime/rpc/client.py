"""The request-plane client: one multiplexed connection per server address, a stream per call.

    client = RpcClient()
    async with client.call(address, "generate", request, GenerateOutput) as stream:
        async for out in stream:
            ...

Invariants:
- A stream ends in exactly one way: normal end (StopAsyncIteration), a `RemoteError`/`RpcCancelled`
  from the server, or `RpcConnectionError` the moment the connection is lost (never a hang).
- Leaving a stream early (break + exit of `async with`, `aclose()`, or cancellation of the task that
  is waiting on it) sends `Cancel`, so the server-side handler is cancelled too.
- With a `token`, it is the first frame on every connection (the server's `Auth` check).
- Received items are buffered per stream; past a high-water mark across the connection, reading from
  the socket pauses, so a slow consumer bounds memory and the server feels backpressure.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any

import msgspec

from kvrelay.runtime.rpc.conn import FramedProtocol, parse_address
from kvrelay.runtime.rpc.errors import (
    EndpointNotFound,
    FailKind,
    RemoteError,
    RpcCancelled,
    RpcConnectionError,
)
from kvrelay.runtime.rpc.frames import (
    DEFAULT_MAX_FRAME,
    Auth,
    Call,
    Cancel,
    ClientInbound,
    End,
    Fail,
    _ItemIn,
)
from kvrelay.runtime.wire import decoder

PAUSE_ITEMS, RESUME_ITEMS = 8192, 2048


class _ClientConnection(FramedProtocol):
    inbound = ClientInbound

    def __init__(self, address: str, max_frame: int):
        super().__init__(max_frame)
        self.address = address
        self.streams: dict[int, RpcStream] = {}
        self.ids = itertools.count(1)
        self.buffered = 0
        self.reading_paused = False

    def on_frame(self, frame: Any) -> None:
        stream = self.streams.get(frame.id)
        if stream is None:
            return  # a late frame for a stream the caller already left
        if isinstance(frame, _ItemIn):
            stream._push(frame.payload)
            self.buffered += 1
            if self.buffered >= PAUSE_ITEMS and not self.reading_paused and self.transport is not None:
                self.reading_paused = True
                self.transport.pause_reading()
        elif isinstance(frame, End):
            stream._finish(None)
        elif isinstance(frame, Fail):
            stream._finish(_error_from(frame, self.address))

    def consumed(self, n: int = 1) -> None:
        self.buffered -= n
        if self.reading_paused and self.buffered <= RESUME_ITEMS and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def on_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        for stream in list(self.streams.values()):
            stream._finish(RpcConnectionError(f"connection to {self.address} lost{reason}"))


def _error_from(fail: Fail, address: str) -> Exception:
    if fail.kind == FailKind.ENDPOINT_NOT_FOUND:
        return EndpointNotFound(fail.kind, fail.message)
    if fail.kind == FailKind.CANCELLED:
        return RpcCancelled(f"{address} cancelled the call: {fail.message}")
    return RemoteError(fail.kind, fail.message)


class RpcStream:
    """One call's responses. Iterate it; use `async with` (or `aclose()`) to leave early."""

    def __init__(self, client: RpcClient, address: str, endpoint: str, request: Any, response_type: Any):
        self._client, self._address, self._endpoint = client, address, endpoint
        self._request, self._type = request, response_type
        self._conn: _ClientConnection | None = None
        self._id = 0
        self._items: deque[msgspec.Raw] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False  # End/Fail received or connection lost: the server holds nothing for us
        self._error: Exception | None = None
        self.received = 0  # responses received so far (a watchdog reads progress from it)

    async def _start(self) -> None:
        conn = await self._client._connection(self._address)
        self._conn, self._id = conn, next(conn.ids)
        conn.streams[self._id] = self
        try:
            conn.send(Call(self._id, self._endpoint, self._request))
        except Exception:
            conn.streams.pop(self._id, None)
            raise

    # -- called by the connection -------------------------------------------------------------------
    def _push(self, payload: msgspec.Raw) -> None:
        self._items.append(payload)
        self.received += 1
        self._wake()

    def _finish(self, error: Exception | None) -> None:
        self._ended, self._error = True, error
        if self._conn is not None:
            self._conn.streams.pop(self._id, None)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- iteration ----------------------------------------------------------------------------------
    def __aiter__(self) -> RpcStream:
        return self

    async def __anext__(self) -> Any:
        if self._conn is None and not self._ended:
            await self._start()
        while not self._items:
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                self.cancel()
                raise
            finally:
                self._waiter = None
        raw = self._items.popleft()
        assert self._conn is not None  # items only arrive once _start() set the connection
        self._conn.consumed()
        return bytes(raw) if self._type is None else decoder(self._type).decode(raw)

    def pop_ready(self) -> Any | None:
        """The next response if one has already arrived, else None (never waits). Lets a consumer
        that fell behind merge a backlog into one unit of work instead of paying per item."""
        if not self._items:
            return None
        raw = self._items.popleft()
        assert self._conn is not None  # items only arrive once _start() set the connection
        self._conn.consumed()
        return bytes(raw) if self._type is None else decoder(self._type).decode(raw)

    def cancel(self) -> None:
        """Stop the call: the server-side handler is cancelled; iteration ends with StopAsyncIteration."""
        conn = self._conn
        if conn is not None:
            if not self._ended:
                conn.streams.pop(self._id, None)
                conn.send(Cancel(self._id))
            conn.consumed(len(self._items))
        self._items.clear()
        self._ended = True
        self._wake()

    def fail(self, error: Exception) -> None:
        """End the call from the caller's side with `error`: iteration raises it at once (also a waiting
        one) and the server is sent `Cancel`. For a server that stopped answering without closing its
        connection (frozen, or gone from discovery): a caller treats it like a lost connection."""
        if self._ended:
            return
        conn = self._conn
        if conn is not None:
            conn.streams.pop(self._id, None)
            conn.send(Cancel(self._id))
            conn.consumed(len(self._items))
        self._items.clear()
        self._ended, self._error = True, error
        self._wake()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> RpcStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    async def collect(self) -> list[Any]:
        async with self:
            return [item async for item in self]


class RpcClient:
    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, connect_timeout: float = 5.0, token: str = ""):
        self.max_frame, self.connect_timeout, self.token = max_frame, connect_timeout, token
        self._conns: dict[str, _ClientConnection] = {}
        self._connecting: dict[str, asyncio.Future[_ClientConnection]] = {}

    def call(self, address: str, endpoint: str, request: Any, response_type: Any = None) -> RpcStream:
        """Start a call lazily: the connection is made and the request sent on first iteration."""
        return RpcStream(self, address, endpoint, request, response_type)

    async def unary(self, address: str, endpoint: str, request: Any, response_type: Any = None) -> Any:
        """A call that yields exactly one response."""
        items = await self.call(address, endpoint, request, response_type).collect()
        if len(items) != 1:
            raise RemoteError("ProtocolError", f"{endpoint} returned {len(items)} items, expected 1")
        return items[0]

    async def _connection(self, address: str) -> _ClientConnection:
        conn = self._conns.get(address)
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting.get(address)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[_ClientConnection] = asyncio.get_running_loop().create_future()
        self._connecting[address] = fut
        try:
            conn = await self._connect(address)
            self._conns[address] = conn
            fut.set_result(conn)
            return conn
        except BaseException as e:
            fut.set_exception(e if isinstance(e, Exception) else RpcConnectionError("connect cancelled"))
            fut.exception()  # mark retrieved: waiters, if any, re-raise it themselves
            raise
        finally:
            del self._connecting[address]

    async def _connect(self, address: str) -> _ClientConnection:
        host, port = parse_address(address)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _ClientConnection(address, self.max_frame), host, port),
                self.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as e:
            raise RpcConnectionError(f"cannot connect to {address}: {e or 'timeout'}") from None
        if self.token:
            conn.send(Auth(self.token))
        return conn

    async def close(self) -> None:
        for conn in list(self._conns.values()):
            conn.abort()
        self._conns.clear()
