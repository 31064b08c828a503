"""In-process discovery: clients share one `MemStore` (no global state). The lease is the client:
`close()` removes its keys. Used by unit tests and single-process setups."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from kvrelay.runtime.discovery.base import WatchEvent, check_key


class MemStore:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.watchers: set[tuple[str, asyncio.Queue[WatchEvent]]] = set()

    def put(self, key: str, value: bytes) -> None:
        self.data[key] = value
        self._notify(WatchEvent("added", key, value))

    def delete(self, key: str) -> None:
        if self.data.pop(key, None) is not None:
            self._notify(WatchEvent("removed", key))

    def _notify(self, ev: WatchEvent) -> None:
        for prefix, queue in tuple(self.watchers):
            if ev.key.startswith(prefix):
                queue.put_nowait(ev)


class MemDiscovery:
    def __init__(self, store: MemStore):
        self._store = store
        self._mine: set[str] = set()

    async def start(self) -> None:
        return None

    async def register(self, key: str, value: bytes) -> None:
        self._store.put(check_key(key), value)
        self._mine.add(key)

    async def deregister(self, key: str) -> None:
        if key in self._mine:
            self._mine.discard(key)
            self._store.delete(key)

    async def list(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self._store.data.items() if k.startswith(prefix)}

    async def watch(self, prefix: str) -> AsyncIterator[WatchEvent]:
        queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        entry = (prefix, queue)
        # Snapshot and subscription happen with no await between them, so no change is missed.
        snapshot = {k: v for k, v in self._store.data.items() if k.startswith(prefix)}
        self._store.watchers.add(entry)
        try:
            for key, value in sorted(snapshot.items()):
                yield WatchEvent("added", key, value)
            while True:
                yield await queue.get()
        finally:
            self._store.watchers.discard(entry)

    async def close(self) -> None:
        for key in tuple(self._mine):
            await self.deregister(key)
