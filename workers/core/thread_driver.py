"""`ThreadDriver`: an `EngineLoop` whose core runs on one dedicated thread, steps back to back while
there is work (the native engine: torch releases the GIL inside kernels, so the event loop stays
responsive). The loop and the thread talk only through a thread-safe inbox (runner.py's commands)
and `call_soon_threadsafe` deliveries of each step's items, batched into one callback per loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from kvrelay.kvbm.events import KvEvent
from kvrelay.workers.api.messages import EngineStats
from kvrelay.workers.core.commands import Command
from kvrelay.workers.core.engine_core import EngineCore
from kvrelay.workers.core.engine_loop import EngineLoop
from kvrelay.workers.core.errors import EngineError
from kvrelay.workers.core.runner import CoreRunner, Deliveries
from kvrelay.workers.core.streams import deliver

log = logging.getLogger(__name__)


class ThreadDriver(EngineLoop):
    thread_name = "kvrelay-engine"

    def __init__(self) -> None:
        super().__init__()
        self._inbox: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stats: EngineStats | None = None  # the thread's latest, read by the loop

    async def _start_thread(self, make_core: Callable[[], EngineCore], tiers: Any = None,
                            rows: Callable[[EngineCore], Any] | None = None) -> None:
        """Build the core off the loop (model loading takes a while), open the tiers, start the thread."""
        if self._thread is not None:
            return
        self.core = await asyncio.to_thread(make_core)
        self.runner = CoreRunner(self.core, self._publish)
        if tiers is not None and tiers.any and rows is not None:
            await self._open_tiers(tiers, rows(self.core))
        self._stats = self.core.stats()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    async def _stop_driver(self) -> None:
        assert self._thread is not None
        self._stop.set()
        self._inbox.put((Command.WAKE, None, None))
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _post(self, cmd: str, arg: Any, extra: Any) -> None:
        self._inbox.put((cmd, arg, extra))

    def _publish(self, events: list[KvEvent]) -> None:
        if self._kv_sink is not None:
            loop, sink = self._kv_sink
            try:
                loop.call_soon_threadsafe(sink, events)
            except RuntimeError:  # that loop is closed: nobody is listening
                pass

    def _core_stats(self) -> EngineStats:
        assert self._stats is not None, "start() first"
        return self._stats

    # -- engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        core, runner = self.core, self.runner
        assert core is not None and runner is not None
        while not self._stop.is_set():
            deliveries: Deliveries = []
            block = not core.has_work()
            while True:
                try:
                    cmd, arg, extra = self._inbox.get(block=block, timeout=0.5 if block else None)
                except queue.Empty:
                    break
                block = False
                runner.command(cmd, arg, extra, deliveries)
            runner.before_step()
            if core.has_work():
                try:
                    runner.route(core.step(), deliveries)
                except Exception as e:  # never leave a request hanging on an engine bug
                    runner.step_failed(e, deliveries)
            runner.after_step(deliveries)
            self._stats = core.stats()
            runner.publish_events()
            deliver(deliveries)
        runner.fail_all(EngineError("engine shut down"), deliveries := [])
        deliver(deliveries)
