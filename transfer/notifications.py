"""Received transfer notifications, matched to waiters by message.

An initiator attaches `notify=b"..."` to a read or write; once the bytes are in place the target
receives `Notification(sender, message)`. The prefill side typically does
`await engine.wait_notification(b"pulled:<request id>", timeout=...)` to learn that a decode worker's
pull finished and the blocks can be released.

Deliveries may come from any thread (the NIXL driver thread, the TCP server's loop). Unclaimed
notifications are kept, oldest dropped past `capacity`, so an initiator that notifies nobody listening
cannot grow memory without bound.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque

from kvrelay.transfer.metadata import Notification

log = logging.getLogger(__name__)


class _Waiter:
    __slots__ = ("message", "loop", "future")

    def __init__(self, message: bytes | None, loop: asyncio.AbstractEventLoop):
        self.message, self.loop = message, loop
        self.future: asyncio.Future[Notification] = loop.create_future()

    def matches(self, n: Notification) -> bool:
        return self.message is None or self.message == n.message


class NotificationBox:
    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._pending: deque[Notification] = deque()
        self._waiters: list[_Waiter] = []
        self.dropped = 0

    @property
    def waiting(self) -> int:
        """Waiters now blocked; the NIXL driver polls for notifications faster while this is > 0."""
        return len(self._waiters)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def deliver(self, n: Notification) -> None:
        """Hand `n` to the oldest matching waiter, else keep it. Thread-safe."""
        with self._lock:
            for i, w in enumerate(self._waiters):
                if w.matches(n) and not w.future.done():
                    del self._waiters[i]
                    w.loop.call_soon_threadsafe(self._resolve, w, n)
                    return
            self._keep(n)

    def _keep(self, n: Notification) -> None:
        self._pending.append(n)
        if len(self._pending) > self.capacity:
            old = self._pending.popleft()
            self.dropped += 1
            log.warning("dropping unclaimed transfer notification %r from %s (capacity %d)",
                        old.message[:64], old.sender, self.capacity)

    def _resolve(self, w: _Waiter, n: Notification) -> None:
        if w.future.done():  # the waiter timed out or was cancelled meanwhile: keep it for the next one
            self.deliver(n)
        else:
            w.future.set_result(n)

    def take(self, message: bytes | None = None) -> Notification | None:
        """Pop the oldest kept notification with `message` (any when None), without waiting."""
        with self._lock:
            for i, n in enumerate(self._pending):
                if message is None or n.message == message:
                    del self._pending[i]
                    return n
        return None

    async def wait(self, message: bytes | None = None, timeout: float | None = None) -> Notification:
        """Wait for a notification with exactly `message` (any when None). TimeoutError after `timeout`."""
        with self._lock:
            for i, n in enumerate(self._pending):
                if message is None or n.message == message:
                    del self._pending[i]
                    return n
            w = _Waiter(message, asyncio.get_running_loop())
            self._waiters.append(w)
        try:
            return await asyncio.wait_for(asyncio.shield(w.future), timeout)
        finally:
            with self._lock:
                if w in self._waiters:
                    self._waiters.remove(w)
            if not w.future.done():
                w.future.cancel()
