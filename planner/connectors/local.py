"""`local`: `kvrelay worker` processes on this machine (the embedded shape of `kvrelay serve --planner`).

A worker counts as ready once it printed `READY <address>` (after it registered in discovery). Scale-up
starts processes; scale-down sends SIGTERM to the newest ones, which drain (deregister, finish their
streams up to their drain timeout) and exit; a worker still alive `stop_grace` seconds later is killed.
A worker that dies on its own stops counting as ready, and the planner's next decision replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from kvrelay.planner.observation import Pool
from kvrelay.runtime.spawn import ChildProcess, spawn

log = logging.getLogger(__name__)


class LocalWorker:
    def __init__(self, name: str, pool: Pool, proc: ChildProcess):
        self.name, self.pool, self.proc = name, pool, proc
        self.address: str | None = None
        self.stopping = False
        self.started = asyncio.get_running_loop().create_task(self._read_stdout())

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            line = raw.decode(errors="replace").strip()
            if self.address is None and line.startswith("READY "):
                self.address = line.split(" ", 1)[1]

    @property
    def serving(self) -> bool:
        return self.address is not None and not self.stopping and self.proc.returncode is None

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None


class LocalConnector:
    kind = "local"

    def __init__(self, argv: Callable[[Pool], list[str]], env: dict[str, str] | None = None,
                 stop_grace: float = 60.0):
        """Workers are started by `runtime.spawn` (vfork + exec; each dies with this process)."""
        self.argv, self.env, self.stop_grace = argv, env, stop_grace
        self.workers: list[LocalWorker] = []
        self._stops: set[asyncio.Task] = set()
        self._n = 0

    async def ready(self) -> dict[Pool, int]:
        self.workers = [w for w in self.workers if w.alive or not w.started.done()]
        return {p: sum(1 for w in self.workers if w.pool is p and w.serving) for p in Pool}

    def _live(self, pool: Pool) -> list[LocalWorker]:
        """Workers of the pool that are starting or serving (not being stopped, not dead)."""
        return [w for w in self.workers if w.pool is pool and w.alive and not w.stopping]

    async def scale(self, target: dict[Pool, int]) -> None:
        for pool, n in target.items():
            live = self._live(pool)
            for _ in range(n - len(live)):
                await self._start(pool)
            # newest first: they hold the least work; a starting one is cheapest of all
            for w in sorted(live, key=lambda w: (w.address is not None, -self.workers.index(w)))[:max(0, len(live) - n)]:
                w.stopping = True
                task = asyncio.create_task(self._stop(w))
                self._stops.add(task)
                task.add_done_callback(self._stops.discard)

    async def _start(self, pool: Pool) -> None:
        self._n += 1
        proc = await spawn(self.argv(pool), self.env)
        worker = LocalWorker(f"{pool.value}-p{self._n}", pool, proc)
        self.workers.append(worker)
        log.info("planner: started %s (pid %d)", worker.name, proc.pid)

    async def _stop(self, w: LocalWorker) -> None:
        log.info("planner: stopping %s (SIGTERM: drain)", w.name)
        with contextlib.suppress(ProcessLookupError):
            w.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(w.proc.wait(), self.stop_grace)
        except asyncio.TimeoutError:
            log.warning("planner: %s still running %.0f s after SIGTERM; killing it", w.name, self.stop_grace)
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            await w.proc.wait()

    async def close(self) -> None:
        for w in self.workers:
            if w.alive and not w.stopping:
                w.stopping = True
                self._stops.add(asyncio.create_task(self._stop(w)))
        await asyncio.gather(*self._stops, return_exceptions=True)
        for w in self.workers:
            w.started.cancel()
