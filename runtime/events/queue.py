"""A bounded subscriber queue shared by the inproc and zmq backends.

Overflow drops the oldest message and counts it (`dropped`), so a stalled consumer costs bounded
memory and the publisher never blocks on it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from kvrelay.runtime.events.base import Message


class QueueSubscription:
    def __init__(self, pattern: str, maxlen: int, on_close: Callable[[QueueSubscription], Awaitable[None]]):
        self.pattern = pattern
        self.dropped = 0
        self._items: deque[Message] = deque()
        self._maxlen = maxlen
        self._wakeup = asyncio.Event()
        self._closed = False
        self._on_close = on_close

    def deliver(self, message: Message) -> None:
        if self._closed:
            return
        if len(self._items) >= self._maxlen:
            self._items.popleft()
            self.dropped += 1
        self._items.append(message)
        self._wakeup.set()

    def __aiter__(self) -> QueueSubscription:
        return self

    async def __anext__(self) -> Message:
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._items.popleft()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._wakeup.set()
            await self._on_close(self)
