"""The event-plane contract shared by every backend (inproc, zmq, nats).

Publish/subscribe on subjects (see `subjects.py`). Payloads are msgspec Structs encoded as msgpack;
subscribers get `Message`s and decode them with the type they expect.

Invariants every backend keeps (checked by tests/runtime/test_events_contract.py):
- When `subscribe()` returns, the subscription is live: a message published afterwards by any client
  of the same plane and matching the pattern is delivered to it.
- Messages from one publisher on one subject arrive in publish order.
- Delivery is at-most-once: consumers that need completeness (the KV router) detect gaps by sequence
  numbers and resync. A slow subscriber's queue is bounded; overflow drops the oldest and counts it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, TypeVar, runtime_checkable

import msgspec

from kvrelay.runtime.wire import decode

T = TypeVar("T")


class Message(msgspec.Struct, frozen=True):
    subject: str
    data: bytes

    def decode(self, type_: type[T]) -> T:
        return decode(self.data, type_)


@runtime_checkable
class Subscription(Protocol):
    pattern: str
    dropped: int  # messages dropped because this subscriber fell behind

    def __aiter__(self) -> AsyncIterator[Message]: ...

    async def close(self) -> None: ...


@runtime_checkable
class EventPlane(Protocol):
    async def start(self) -> None:
        """Connect. Idempotent."""

    async def publish(self, subject: str, message: msgspec.Struct | bytes) -> None:
        """Publish a Struct (encoded as msgpack) or pre-encoded bytes."""

    async def subscribe(self, pattern: str) -> Subscription:
        """Subscribe; live when this returns."""

    async def close(self) -> None: ...
