"""NATS event plane: the distributed backend (processes on several machines share a nats-server).

NATS implements the subject rules of `subjects.py` natively (`*`, `>`), orders messages per
publisher connection, and is at-most-once (core NATS, no JetStream) — exactly the contract in base.py.

- Live on return: after SUB, `subscribe()` subscribes to a unique probe subject on the same connection
  and publishes to it until the probe comes back. The server handles one connection's commands in
  order, so a returned probe proves it holds the SUB. (`nc.flush()` is not enough with nats-py 2.16:
  `_send_ping` writes PING straight to the transport, overtaking a SUB still queued for the flusher
  task, so flush() can return before the server has seen the SUB — observed as lost messages.)
- Outages: the client reconnects forever (`max_reconnect_attempts=-1`) and nats-py replays every SUB
  on reconnect, so subscriptions survive a server restart. Messages published while the server is
  gone are buffered up to the client's pending limit and then dropped (counted in `publish_dropped`);
  subscribers see a gap, which consumers that need completeness detect by sequence numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import msgspec
from nats import errors as nats_errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from kvrelay.runtime.events.base import Message
from kvrelay.runtime.events.queue import QueueSubscription
from kvrelay.runtime.events.subjects import check_pattern, check_subject
from kvrelay.runtime.wire import encode

log = logging.getLogger(__name__)

PROBE_PREFIX = "_kvrelay.probe."  # internal subjects (same as the zmq plane): never delivered to users
PROBE_INTERVAL_S = 0.05


class NatsEventPlane:
    def __init__(self, servers: list[str], queue_size: int = 10_000, connect_timeout: float = 2.0,
                 start_timeout: float = 10.0, reconnect_time_wait: float = 0.2):
        if not servers:
            raise ValueError("NatsEventPlane needs at least one server URL")
        self.servers = list(servers)
        self.publish_dropped = 0  # messages refused while disconnected with a full outbound buffer
        self._queue_size = queue_size
        self._connect_timeout = connect_timeout
        self._start_timeout = start_timeout
        self._reconnect_time_wait = reconnect_time_wait
        self._nc: Client | None = None
        self._start_lock = asyncio.Lock()
        self._closed = False
        self._subs: dict[QueueSubscription, NatsSubscription] = {}

    async def start(self) -> None:
        async with self._start_lock:
            if self._closed:
                raise RuntimeError("NatsEventPlane is closed")
            if self._nc is not None:
                return
            nc = Client()
            # With max_reconnect_attempts=-1 nats-py retries the *initial* connect forever too;
            # bound it so a wrong URL fails start() instead of hanging it.
            try:
                await asyncio.wait_for(nc.connect(
                    servers=self.servers,
                    max_reconnect_attempts=-1,
                    # nats-py annotates these int, and passes them to asyncio.sleep/wait_for: floats work
                    reconnect_time_wait=self._reconnect_time_wait,  # type: ignore[arg-type]  # see above
                    connect_timeout=self._connect_timeout,  # type: ignore[arg-type]  # see above
                    drain_timeout=2,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                ), self._start_timeout)
            except (asyncio.TimeoutError, OSError, nats_errors.Error) as e:
                with contextlib.suppress(Exception):
                    await nc.close()
                raise ConnectionError(f"NATS server(s) {', '.join(self.servers)} not reachable: {e!r}") from e
            self._nc = nc
            log.info("nats event plane connected to %s", nc.connected_url.netloc if nc.connected_url else "?")

    async def _on_error(self, e: Exception) -> None:
        log.debug("nats event plane: %r", e)

    async def _on_disconnected(self) -> None:
        if self._nc is not None and not self._closed:  # not during a failing initial connect
            log.warning("nats event plane: disconnected from %s, reconnecting", ", ".join(self.servers))

    async def _on_reconnected(self) -> None:
        assert self._nc is not None
        url = self._nc.connected_url
        log.warning("nats event plane: reconnected to %s, subscriptions replayed", url.netloc if url else "?")

    async def _on_closed(self) -> None:
        log.debug("nats event plane: connection closed")

    async def _client(self) -> Client:
        if self._nc is None:
            await self.start()
        assert self._nc is not None
        return self._nc

    async def publish(self, subject: str, message: msgspec.Struct | bytes) -> None:
        check_subject(subject)
        data = message if isinstance(message, bytes) else encode(message)
        nc = await self._client()
        try:
            await nc.publish(subject, data)
        except nats_errors.OutboundBufferLimitError:
            self.publish_dropped += 1
            if self.publish_dropped == 1 or self.publish_dropped % 10_000 == 0:
                log.warning("nats event plane: disconnected and buffer full, %d messages dropped so far",
                            self.publish_dropped)

    async def subscribe(self, pattern: str) -> QueueSubscription:
        check_pattern(pattern)
        nc = await self._client()
        sub = QueueSubscription(pattern, self._queue_size, self._unsubscribe)

        async def deliver(msg: Msg) -> None:  # nats-py requires a coroutine callback
            if not msg.subject.startswith(PROBE_PREFIX):
                sub.deliver(Message(msg.subject, msg.data))

        self._subs[sub] = await nc.subscribe(pattern, cb=deliver)
        try:
            await self._round_trip(nc)  # the server holds the interest: live on return
        except BaseException:
            await sub.close()
            raise
        return sub

    async def _round_trip(self, nc: Client) -> None:
        """Subscribe to a unique probe and publish it until it comes back (module docstring). Retried
        because a probe sent while reconnecting can be lost."""
        loop = asyncio.get_running_loop()
        probe = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        arrived: asyncio.Future[None] = loop.create_future()

        async def on_probe(_: Msg) -> None:
            if not arrived.done():
                arrived.set_result(None)

        psub = await nc.subscribe(probe, cb=on_probe)
        try:
            deadline = loop.time() + self._start_timeout
            while not arrived.done():
                if loop.time() >= deadline:
                    raise ConnectionError(
                        f"NATS server(s) {', '.join(self.servers)}: subscription not confirmed within "
                        f"{self._start_timeout:g}s")
                await nc.publish(probe, b"")
                await asyncio.wait({arrived}, timeout=PROBE_INTERVAL_S)
        finally:
            with contextlib.suppress(nats_errors.Error):
                await psub.unsubscribe()

    async def _unsubscribe(self, sub: QueueSubscription) -> None:
        nsub = self._subs.pop(sub, None)
        if nsub is not None:
            with contextlib.suppress(nats_errors.Error):  # closed/draining connection: nothing to undo
                await nsub.unsubscribe()

    async def close(self) -> None:
        self._closed = True
        for sub in tuple(self._subs):
            await sub.close()
        nc, self._nc = self._nc, None
        if nc is None:
            return
        try:
            await nc.drain()  # flushes what was published, then closes
        except (nats_errors.Error, asyncio.TimeoutError):
            await nc.close()  # not connected right now: nothing can be flushed
