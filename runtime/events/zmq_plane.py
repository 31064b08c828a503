"""ZMQ event plane: the embedded default (several processes on one machine, no external server).

Shape: every process owns one `ZmqEventPlane` (a PUB connected to the broker's XSUB, a SUB connected
to the broker's XPUB); one process runs the `ZmqBroker`, an XSUB/XPUB proxy. Frames are
[subject, data].

Why subscriptions are live when `subscribe()` returns (ZMQ's slow-joiner problem):
- The broker's XSUB subscribes to *everything*, so every publisher sends every message to the broker
  and filtering happens in the broker's XPUB (per subscriber, by byte prefix). A new filter is
  therefore effective as soon as the *broker* has processed it, whoever publishes.
- After adding its filter, `subscribe()` subscribes to a unique probe subject and publishes probes
  until one comes back through the broker. Subscriptions travel in order on one pipe, so a returned
  probe proves the broker's XPUB holds the earlier filter; anything published after `subscribe()`
  returns reaches the broker later and passes that filter.
- `start()` does the same probe round trip, which also proves this plane's PUB is connected (a PUB
  without a peer silently drops), so a fresh publisher loses nothing either.
ZMQ filters by prefix only (`literal_prefix(pattern)`); exact matching uses `matches()` on receipt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import uuid
from collections import Counter
from typing import TypeVar

import msgspec
import zmq
import zmq.asyncio

from kvrelay.runtime.events.base import Message
from kvrelay.runtime.events.queue import QueueSubscription
from kvrelay.runtime.events.subjects import check_pattern, check_subject, literal_prefix, matches
from kvrelay.runtime.paths import default_run_dir
from kvrelay.runtime.wire import encode

log = logging.getLogger(__name__)

PROBE_PREFIX = "_kvrelay.probe."  # internal subjects: never delivered to user subscriptions
HWM = 100_000  # messages buffered per pipe before ZMQ drops; events are small
PROBE_INTERVAL_S = 0.01
READ_BURST = 256  # messages read at once after an awaited one, before the reader yields to the loop
SocketT = TypeVar("SocketT", bound=zmq.Socket)  # the context's socket class (zmq.asyncio's for the plane)


def default_endpoints() -> tuple[str, str]:
    """(pub, sub) ipc endpoints in the run dir: publishers connect to pub, subscribers to sub."""
    run_dir = default_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return f"ipc://{run_dir / 'events-pub.sock'}", f"ipc://{run_dir / 'events-sub.sock'}"


class ZmqBrokerUnreachable(ConnectionError):
    pass


def _socket(ctx: zmq.Context[SocketT], kind: int, options: dict[int, int] | None = None) -> SocketT:
    """A socket with LINGER 0 (closing never waits on a dead peer) and `options` set."""
    sock = ctx.socket(kind)
    for opt, value in {zmq.LINGER: 0, **(options or {})}.items():
        sock.setsockopt(opt, value)
    return sock


def _refuse_live_ipc(endpoint: str) -> None:
    """libzmq unlinks an existing ipc socket file on bind, which would silently steal the endpoint
    from a running broker. Refuse if something still accepts connections there."""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://"):]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return  # no file, or a stale one from a dead broker: libzmq replaces it
    raise RuntimeError(f"a ZMQ event broker is already running at {endpoint}")


class ZmqBroker:
    """XSUB (bound on pub_endpoint) <-> XPUB (bound on sub_endpoint), forwarded by `zmq.proxy_steerable`
    in a daemon thread (libzmq forwards without the GIL). Sync API: `start()` binds (bind errors raise
    here), `close()` terminates the proxy and joins the thread. tcp endpoints may use port `*`; the
    bound addresses are then in `pub_endpoint` / `sub_endpoint`."""

    def __init__(self, pub_endpoint: str, sub_endpoint: str):
        self.pub_endpoint, self.sub_endpoint = pub_endpoint, sub_endpoint
        self._ctx: zmq.Context | None = None
        self._thread: threading.Thread | None = None
        self._control = f"inproc://kvrelay-broker-control-{uuid.uuid4().hex}"

    def start(self) -> None:
        if self._ctx is not None:
            return
        for ep in (self.pub_endpoint, self.sub_endpoint):
            _refuse_live_ipc(ep)
        ctx = zmq.Context()
        try:
            xsub = _socket(ctx, zmq.XSUB, {zmq.RCVHWM: HWM})
            xpub = _socket(ctx, zmq.XPUB, {zmq.SNDHWM: HWM})
            control = _socket(ctx, zmq.PAIR)
            xsub.bind(self.pub_endpoint)
            xpub.bind(self.sub_endpoint)
            control.bind(self._control)
            xsub.send(b"\x01")  # subscribe upstream to everything: the XPUB filters (module docstring)
        except BaseException:
            ctx.destroy(linger=0)
            raise
        self.pub_endpoint = xsub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sub_endpoint = xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ctx = ctx
        # Sockets move to the proxy thread; thread start is the memory barrier ZMQ requires.
        self._thread = threading.Thread(
            target=self._run, args=(xsub, xpub, control), name="kvrelay-zmq-broker", daemon=True)
        self._thread.start()
        log.info("zmq event broker: publishers -> %s, subscribers -> %s", self.pub_endpoint, self.sub_endpoint)

    @staticmethod
    def _run(xsub: zmq.Socket, xpub: zmq.Socket, control: zmq.Socket) -> None:
        try:
            zmq.proxy_steerable(xsub, xpub, None, control)
        except zmq.ContextTerminated:
            pass
        except Exception:
            log.exception("zmq event broker stopped with an error")
        finally:
            for sock in (xsub, xpub, control):
                sock.close(linger=0)

    def close(self) -> None:
        if self._ctx is None:
            return
        assert self._thread is not None
        with self._ctx.socket(zmq.PAIR) as ctl:
            ctl.setsockopt(zmq.LINGER, 0)
            ctl.connect(self._control)
            ctl.send(b"TERMINATE")
            self._thread.join(timeout=5)
        if self._thread.is_alive():  # should not happen; term() below would then block, so fail loudly
            raise RuntimeError("zmq event broker thread did not stop")
        self._ctx.term()
        self._ctx, self._thread = None, None

    def __enter__(self) -> ZmqBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ZmqEventPlane:
    def __init__(self, pub_endpoint: str, sub_endpoint: str, queue_size: int = 10_000,
                 ready_timeout: float = 5.0):
        self.pub_endpoint, self.sub_endpoint = pub_endpoint, sub_endpoint
        self.publish_dropped = 0  # messages this PUB refused because its send queue was full
        self._queue_size = queue_size
        self._ready_timeout = ready_timeout
        self._ctx: zmq.asyncio.Context | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._pub_now: zmq.Socket | None = None  # the same PUB as a plain socket: sends that never wait
        self._sub: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._closed = False
        self._ready = False  # set once start()'s probe came back; until then publishing could be lost
        self._subs: dict[QueueSubscription, bytes] = {}  # subscription -> its ZMQ prefix filter
        self._prefixes: Counter[bytes] = Counter()  # refcount: filter removed when it reaches 0
        self._probes: dict[str, asyncio.Future[None]] = {}

    async def start(self) -> None:
        async with self._start_lock:
            if self._closed:
                raise RuntimeError("ZmqEventPlane is closed")
            if self._ready:
                return
            self._ctx = zmq.asyncio.Context()
            # XPUB_NODROP: at the HWM the PUB says EAGAIN (counted) instead of dropping silently.
            self._pub = _socket(self._ctx, zmq.PUB, {zmq.SNDHWM: HWM, zmq.XPUB_NODROP: 1})
            self._sub = _socket(self._ctx, zmq.SUB, {zmq.RCVHWM: HWM})
            self._pub.connect(self.pub_endpoint)
            self._pub_now = zmq.Socket.shadow(self._pub.underlying)
            self._sub.connect(self.sub_endpoint)
            self._reader = asyncio.create_task(self._read_loop(), name="kvrelay-zmq-events-reader")
            try:
                await self._round_trip()
            except BaseException:
                await self._teardown()
                raise
            self._ready = True

    async def publish(self, subject: str, message: msgspec.Struct | bytes) -> None:
        check_subject(subject)
        data = message if isinstance(message, bytes) else encode(message)
        if not self._ready:
            await self.start()
        await self._send(subject.encode(), data)

    async def _send(self, subject: bytes, data: bytes) -> None:
        assert self._pub_now is not None
        # NOBLOCK: publishing never waits on a slow broker (at-most-once, see base.py). So it needs no
        # future either: the plain socket sends at once (zmq.asyncio's send builds a future and loop
        # callbacks per message: 20% of a mocker worker's CPU under a streamed-chat load, issue 33).
        try:
            self._pub_now.send_multipart([subject, data], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.publish_dropped += 1
            if self.publish_dropped == 1 or self.publish_dropped % 10_000 == 0:
                log.warning("zmq event plane: send queue full, %d messages dropped so far", self.publish_dropped)

    async def subscribe(self, pattern: str) -> QueueSubscription:
        check_pattern(pattern)
        if not self._ready:
            await self.start()
        assert self._sub is not None
        sub = QueueSubscription(pattern, self._queue_size, self._unsubscribe)
        prefix = literal_prefix(pattern).encode()
        self._subs[sub] = prefix  # registered before the filter, so nothing that passes it is missed
        if self._prefixes[prefix] == 0:
            self._sub.setsockopt(zmq.SUBSCRIBE, prefix)
        self._prefixes[prefix] += 1
        try:
            await self._round_trip()
        except BaseException:
            await sub.close()
            raise
        return sub

    async def _unsubscribe(self, sub: QueueSubscription) -> None:
        prefix = self._subs.pop(sub, None)
        if prefix is None:
            return
        self._prefixes[prefix] -= 1
        if self._prefixes[prefix] == 0:
            del self._prefixes[prefix]
            if self._sub is not None:
                self._sub.setsockopt(zmq.UNSUBSCRIBE, prefix)

    async def _round_trip(self) -> None:
        """Publish a unique probe until it comes back through the broker (see module docstring)."""
        assert self._sub is not None
        loop = asyncio.get_running_loop()
        probe = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        arrived: asyncio.Future[None] = loop.create_future()
        self._probes[probe] = arrived
        self._sub.setsockopt(zmq.SUBSCRIBE, probe.encode())
        try:
            deadline = loop.time() + self._ready_timeout
            while not arrived.done():
                if loop.time() >= deadline:
                    raise ZmqBrokerUnreachable(
                        f"ZMQ event broker at {self.pub_endpoint} (subscribers: {self.sub_endpoint}) is not "
                        f"reachable: no probe came back within {self._ready_timeout:g}s. Is the broker running?")
                await self._send(probe.encode(), b"")
                await asyncio.wait({arrived}, timeout=PROBE_INTERVAL_S)
        finally:
            self._probes.pop(probe, None)
            if self._sub is not None:
                self._sub.setsockopt(zmq.UNSUBSCRIBE, probe.encode())

    async def _read_loop(self) -> None:
        assert self._sub is not None
        sub_now: zmq.Socket = zmq.Socket.shadow(self._sub.underlying)  # the same SUB as a plain socket
        while True:
            try:
                self._dispatch(await self._sub.recv_multipart())
                # What else has arrived is read at once, without a future per message (zmq.asyncio's
                # recv costs 6% of a frontend's CPU under a streamed-chat load, issue 33); a bounded
                # burst, then the loop runs its other callbacks.
                for _ in range(READ_BURST):
                    self._dispatch(sub_now.recv_multipart(zmq.NOBLOCK))
                await asyncio.sleep(0)  # more may be waiting: the loop's other callbacks run first
            except zmq.Again:
                continue
            except zmq.ZMQError as e:
                log.error("zmq event plane: receive failed, reader stops: %s", e)
                return

    def _dispatch(self, frames: list[bytes]) -> None:
        try:
            raw_subject, data = frames
            subject = raw_subject.decode()
        except (ValueError, UnicodeDecodeError):  # not [subject, data]: not from a kvrelay plane
            return
        if subject.startswith(PROBE_PREFIX):
            arrived = self._probes.get(subject)
            if arrived is not None and not arrived.done():
                arrived.set_result(None)
            return
        msg = Message(subject, data)
        for sub in tuple(self._subs):
            if matches(sub.pattern, subject):
                sub.deliver(msg)

    async def close(self) -> None:
        self._closed = True
        for sub in tuple(self._subs):
            await sub.close()
        await self._teardown()

    async def _teardown(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)  # closes both sockets; LINGER 0: never wait on a dead broker
        self._ctx = self._pub = self._pub_now = self._sub = None
        self._ready = False
