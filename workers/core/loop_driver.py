"""`LoopDriver`: an `EngineLoop` whose core runs on the event loop itself, one step at a time, each
taking the time `step_time(scheduled)` says (the mocker: a timing model, nothing computed). Everything
runs on one loop, so no state needs a lock.

Invariants:
- A step is scheduled, slept, then completed. A request aborted while its step sleeps is finished at
  once (its blocks freed) and skipped at completion: nothing is published from a released block.
- KV events are handed to the sink synchronously, in event_id order, after every command, schedule
  and completion: the events handed out always describe exactly what the pool and tiers hold.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kvrelay.kvbm.events import KvEvent
from kvrelay.workers.core.engine_loop import EngineLoop
from kvrelay.workers.core.errors import EngineError
from kvrelay.workers.core.executor import Scheduled
from kvrelay.workers.core.runner import Deliveries

log = logging.getLogger(__name__)


class LoopDriver(EngineLoop):
    task_name = "kvrelay-engine-loop"

    def __init__(self) -> None:
        super().__init__()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def step_time(self, scheduled: Scheduled) -> tuple[float, float]:
        """(seconds the step models, wall seconds to sleep for it)."""
        raise NotImplementedError

    async def _start_loop(self, tiers: Any = None, rows: Any = None) -> None:
        if self._task is not None:
            return
        if tiers is not None and tiers.any:
            await self._open_tiers(tiers, rows())
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def _stop_driver(self) -> None:
        task, self._task = self._task, None
        assert task is not None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._finish(lambda d: self.runner.fail_all(EngineError("engine shut down"), d))

    @property
    def running(self) -> bool:
        return self._task is not None

    def _post(self, cmd: str, arg: Any, extra: Any) -> None:
        self._finish(lambda d: self.runner.command(cmd, arg, extra, d))
        self._wake.set()  # freed blocks or a finished load may let a waiting request run

    def _publish(self, events: list[KvEvent]) -> None:
        if self._kv_sink is not None:
            self._kv_sink[1](events)

    def _finish(self, work) -> None:
        """Run `work(deliveries)` on the runner, then hand its events and items on, in that order."""
        deliveries: Deliveries = []
        work(deliveries)
        self.runner.publish_events()
        for stream, item in deliveries:
            stream.queue.put_nowait(item)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        core, runner = self.core, self.runner
        try:
            while True:
                started, preemptions = loop.time(), core.scheduler.preemptions
                runner.before_step()
                scheduled = core.schedule()
                self._finish(runner.after_step)  # allocation may have evicted; loads planned for the head
                if not scheduled:
                    if core.scheduler.preemptions == preemptions:  # idle: wait for a request or an abort
                        self._wake.clear()
                        await self._wake.wait()
                    continue  # else the preempted sequence is admitted again on the next schedule
                modeled, wall = self.step_time(scheduled)
                # Sleep until the modeled end of the step; bookkeeping time counts toward it.
                await asyncio.sleep(max(0.0, started + wall - loop.time()))
                outputs = core.complete(scheduled, core.executor.execute(scheduled), modeled)

                def done(d: Deliveries, outputs=outputs) -> None:
                    runner.route(outputs, d)
                    runner.after_step(d)

                self._finish(done)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never leave a request hanging on an engine bug
            error = e
            self._finish(lambda d: runner.step_failed(error, d))
            self._task = None
