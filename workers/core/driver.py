"""`CoreDriver`: who owns an `EngineCore` and steps it, composed into `EngineLoop` (engine_loop.py).
Two exist: `ThreadDriver` (one dedicated thread, steps back to back: compute that releases the GIL,
the native engine) and `LoopDriver` (steps on the event loop, each as long as a timing model says: the
mocker). Both apply commands through the same `CoreRunner` (runner.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from kvrelay.kvbm.events import KvEvent
from kvrelay.workers.api.messages import EngineStats
from kvrelay.workers.core.commands import Command
from kvrelay.workers.core.engine_core import EngineCore
from kvrelay.workers.core.runner import CoreRunner

Sink = tuple[asyncio.AbstractEventLoop, Callable[[list[KvEvent]], None]]


class CoreDriver(Protocol):
    @property
    def running(self) -> bool: ...

    async def start(self, core: EngineCore, runner: CoreRunner) -> None:
        """Start stepping `core` (its commands applied by `runner`)."""

    def post(self, cmd: Command) -> None:
        """Hand a command to the core's owner (from the event loop or any thread)."""

    def publish(self, sink: Sink, events: list[KvEvent]) -> None:
        """Hand KV events to `sink`, in order; called by the core's owner."""

    def stats(self) -> EngineStats:
        """The core's latest stats (safe to call from the event loop)."""

    async def stop(self) -> None:
        """Stop stepping; every request still in flight ends with "engine shut down"."""
