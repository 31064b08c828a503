"""`ThreadDriver`: an `EngineCore` run on one dedicated thread, stepping back to back while there is
work (the native engine: torch releases the GIL inside kernels, so the event loop stays responsive).
The loop and the thread talk only through a thread-safe inbox of commands (commands.py) and
`call_soon_threadsafe` deliveries of each step's items, batched into one callback per loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading

from kvrelay.kvbm.events import KvEvent
from kvrelay.workers.api.errors import EngineError
from kvrelay.workers.api.messages import EngineStats
from kvrelay.workers.core.commands import Command, Wake
from kvrelay.workers.core.driver import Sink
from kvrelay.workers.core.engine_core import EngineCore
from kvrelay.workers.core.runner import CoreRunner, Deliveries
from kvrelay.workers.core.streams import deliver

log = logging.getLogger(__name__)


class ThreadDriver:
    def __init__(self, thread_name: str = "kvrelay-engine"):
        self.thread_name = thread_name
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stats: EngineStats | None = None  # the thread's latest, read by the loop
        self._core: EngineCore | None = None
        self._runner: CoreRunner | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    async def start(self, core: EngineCore, runner: CoreRunner) -> None:
        if self._thread is not None:
            return
        self._core, self._runner, self._stats = core, runner, core.stats()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        assert self._thread is not None
        self._stop.set()
        self._inbox.put(Wake())
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def post(self, cmd: Command) -> None:
        self._inbox.put(cmd)

    def publish(self, sink: Sink, events: list[KvEvent]) -> None:
        loop, fn = sink
        try:
            loop.call_soon_threadsafe(fn, events)
        except RuntimeError:  # that loop is closed: nobody is listening
            pass

    def stats(self) -> EngineStats:
        assert self._stats is not None, "start() first"
        return self._stats

    # -- engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        core, runner = self._core, self._runner
        assert core is not None and runner is not None
        while not self._stop.is_set():
            deliveries: Deliveries = []
            block = not core.has_work()
            while True:
                try:
                    cmd = self._inbox.get(block=block, timeout=0.5 if block else None)
                except queue.Empty:
                    break
                block = False
                runner.command(cmd, deliveries)
            runner.flush_jobs()
            if core.has_work():
                try:
                    runner.route(core.step(), deliveries)
                except Exception as e:  # never leave a request hanging on an engine bug
                    runner.step_failed(e, deliveries)
            runner.flush_jobs()
            self._stats = core.stats()
            runner.publish_events()
            deliver(deliveries)
        runner.fail_all(EngineError("engine shut down"), deliveries := [])
        deliver(deliveries)
