"""In-process event plane: publishers and subscribers share one `InprocBroker` (no global state)."""

from __future__ import annotations

import msgspec

from kvrelay.runtime.events.base import Message
from kvrelay.runtime.events.queue import QueueSubscription
from kvrelay.runtime.events.subjects import check_pattern, check_subject, matches
from kvrelay.runtime.wire import encode


class InprocBroker:
    def __init__(self) -> None:
        self.subscriptions: set[QueueSubscription] = set()


class InprocEventPlane:
    def __init__(self, broker: InprocBroker, queue_size: int = 10_000):
        self._broker = broker
        self._queue_size = queue_size
        self._mine: set[QueueSubscription] = set()

    async def start(self) -> None:
        return None

    async def publish(self, subject: str, message: msgspec.Struct | bytes) -> None:
        check_subject(subject)
        msg = Message(subject, message if isinstance(message, bytes) else encode(message))
        for sub in tuple(self._broker.subscriptions):
            if matches(sub.pattern, subject):
                sub.deliver(msg)

    async def subscribe(self, pattern: str) -> QueueSubscription:
        sub = QueueSubscription(check_pattern(pattern), self._queue_size, self._drop)
        self._broker.subscriptions.add(sub)
        self._mine.add(sub)
        return sub

    async def _drop(self, sub: QueueSubscription) -> None:
        self._broker.subscriptions.discard(sub)
        self._mine.discard(sub)

    async def close(self) -> None:
        for sub in tuple(self._mine):
            await sub.close()
