"""The discovery contract shared by every backend (mem, file, etcd).

A `Discovery` client owns one lease. Keys it registers live exactly as long as the lease: `close()`
(or process death, after the TTL) removes them. Keys are '/'-separated strings; values are opaque
bytes (callers store msgpack-encoded Structs, see `instances.py`).

Invariants every backend keeps (checked by tests/runtime/test_discovery_contract.py):
- `watch(prefix)` first yields every existing key under the prefix as `added`, then changes, in order
  per key. A value change of a registered key is another `added` with the new value.
- A key is reported `removed` at most once per `added`, and never `removed` without a prior `added`
  on the same watch.
- A lost connection to the backing store never raises out of the client: it is logged and retried,
  and the client's registrations are restored once the store is reachable again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol, runtime_checkable

import msgspec


class WatchEvent(msgspec.Struct, frozen=True):
    kind: Literal["added", "removed"]
    key: str
    value: bytes = b""


@runtime_checkable
class Discovery(Protocol):
    async def start(self) -> None:
        """Connect and acquire the lease. Idempotent."""

    async def register(self, key: str, value: bytes) -> None:
        """Create or replace `key` under this client's lease."""

    async def deregister(self, key: str) -> None:
        """Remove a key this client registered; unknown keys are ignored."""

    async def list(self, prefix: str) -> dict[str, bytes]:
        """Every live key under `prefix`, from any client."""

    def watch(self, prefix: str) -> AsyncIterator[WatchEvent]:
        """Snapshot of `prefix` as `added` events, then live changes, until the iterator is closed."""

    async def close(self) -> None:
        """Release the lease: every key this client registered disappears."""


def check_key(key: str) -> str:
    """Keys are non-empty '/'-separated paths without empty, '.' or '..' segments."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid discovery key {key!r}")
    return key
