"""`LoopDriver`: an `EngineCore` run on the event loop itself, one step at a time, each taking the time
`step_time(scheduled)` says (the mocker: a timing model, nothing computed). Everything runs on one
loop, so no state needs a lock.

Invariants:
- A step is scheduled, slept, then completed. A request aborted while its step sleeps is finished at
  once (its blocks freed) and skipped at completion: nothing is published from a released block.
- KV events are handed to the sink synchronously, in event_id order, after every command, schedule
  and completion: the events handed out always describe exactly what the pool and tiers hold.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from kvrelay.kvbm.events import KvEvent
from kvrelay.workers.api.errors import EngineError
from kvrelay.workers.api.messages import EngineOutput, EngineStats
from kvrelay.workers.core.commands import Command
from kvrelay.workers.core.driver import Sink
from kvrelay.workers.core.engine_core import EngineCore
from kvrelay.workers.core.executor import Scheduled
from kvrelay.workers.core.runner import CoreRunner, Deliveries

log = logging.getLogger(__name__)
StepTime = Callable[[Scheduled], tuple[float, float]]  # (seconds the step models, wall seconds to sleep)


class LoopDriver:
    def __init__(self, step_time: StepTime, task_name: str = "kvrelay-engine-loop"):
        self.step_time, self.task_name = step_time, task_name
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._core: EngineCore | None = None
        self._runner: CoreRunner | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    async def start(self, core: EngineCore, runner: CoreRunner) -> None:
        if self._task is not None:
            return
        self._core, self._runner = core, runner
        self._task = asyncio.create_task(self._run(core, runner), name=self.task_name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        assert task is not None and self._runner is not None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        runner = self._runner
        self._finish(lambda d: runner.fail_all(EngineError("engine shut down"), d))

    def post(self, cmd: Command) -> None:
        runner = self._runner
        assert runner is not None, "start() first"
        self._finish(lambda d: runner.command(cmd, d))
        self._wake.set()  # freed blocks or a finished load may let a waiting request run

    def publish(self, sink: Sink, events: list[KvEvent]) -> None:
        sink[1](events)

    def stats(self) -> EngineStats:
        assert self._core is not None, "start() first"
        return self._core.stats()

    def _finish(self, work: Callable[[Deliveries], None]) -> None:
        """Run `work(deliveries)` on the runner, then hand its jobs, events and items on, in that order."""
        runner = self._runner
        assert runner is not None
        deliveries: Deliveries = []
        work(deliveries)
        runner.flush_jobs()
        runner.publish_events()
        for stream, item in deliveries:
            stream.queue.put_nowait(item)

    async def _run(self, core: EngineCore, runner: CoreRunner) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                started, preemptions = loop.time(), core.scheduler.preemptions
                scheduled = core.schedule()
                self._finish(lambda d: None)  # allocation may have evicted; loads started for the head
                if not scheduled:
                    if core.scheduler.preemptions == preemptions:  # idle: wait for a request or an abort
                        self._wake.clear()
                        await self._wake.wait()
                    continue  # else the preempted sequence is admitted again on the next schedule
                modeled, wall = self.step_time(scheduled)
                # Sleep until the modeled end of the step; bookkeeping time counts toward it.
                await asyncio.sleep(max(0.0, started + wall - loop.time()))
                outputs = core.complete(scheduled, core.executor.execute(scheduled), modeled)
                self._finish(functools.partial(_route, runner, outputs))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never leave a request hanging on an engine bug
            error = e
            self._finish(lambda d: runner.step_failed(error, d))
            self._task = None


def _route(runner: CoreRunner, outputs: list[EngineOutput], deliveries: Deliveries) -> None:
    runner.route(outputs, deliveries)
