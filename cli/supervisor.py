"""Child-process supervision for `kvrelay serve`: start workers, restart crashed ones, stop them all.
A child that exits 0 (a worker drained after SIGTERM, e.g. by an operator or the planner) is not
restarted; any other exit (a crash, SIGKILL) is.

Invariants: a child never outlives the supervisor (PR_SET_PDEATHSIG on Linux delivers SIGTERM to it
if the supervisor dies, even by SIGKILL); `stop()` sends SIGTERM, waits, then SIGKILLs stragglers, so
after it returns no child is running.

Children are started by `runtime.spawn` (CPython's vfork + exec, never the event loop's fork; why there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from kvrelay.runtime.spawn import ChildProcess, spawn

log = logging.getLogger(__name__)


class Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = (),
                 new_session: bool = False):
        """`pass_fds`: file descriptors the child inherits (an HTTP child's listening socket).
        `new_session`: a terminal's Ctrl-C does not reach the child; only the supervisor signals it."""
        self.name, self.argv, self.env, self.pass_fds = name, argv, env, pass_fds
        self.new_session = new_session
        self.proc: ChildProcess | None = None
        self.address: str | None = None
        self.restarts = 0

    async def start(self, ready_timeout: float) -> str:
        self.proc = await spawn(self.argv, self.env, self.pass_fds, self.new_session)
        try:
            line = await asyncio.wait_for(self._ready_line(), ready_timeout)
        except (asyncio.TimeoutError, EOFError):
            await self.stop()
            raise RuntimeError(f"{self.name} did not become ready within {ready_timeout:.0f} s") from None
        if line.startswith("FAILED "):  # the child's own reason it could not start
            await self.stop()
            raise RuntimeError(f"{self.name} failed to start: {line.split(' ', 1)[1]}")
        self.address = line.split(" ", 1)[1]
        asyncio.get_running_loop().create_task(self._drain_stdout())
        return self.address

    async def _ready_line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            raw = await self.proc.stdout.readline()
            if not raw:
                raise EOFError
            line = raw.decode().strip()
            if line.startswith(("READY ", "FAILED ")):
                return line

    async def _drain_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while await self.proc.stdout.readline():
            pass

    async def stop(self, grace: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("%s did not stop within %.0f s; killing it", self.name, grace)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


class Supervisor:
    """Runs children; restarts one that exits unexpectedly (backoff, bounded), until `stop()`."""

    def __init__(self, ready_timeout: float = 120.0, max_restarts: int = 5):
        self.children: list[Child] = []
        self.ready_timeout, self.max_restarts = ready_timeout, max_restarts
        self._stopping = False
        self._watchers: list[asyncio.Task] = []

    async def start(self, children: list[Child]) -> None:
        self.children = children
        await asyncio.gather(*(c.start(self.ready_timeout) for c in children))
        self._watchers = [asyncio.create_task(self._watch(c)) for c in children]

    async def _watch(self, child: Child) -> None:
        while not self._stopping:
            assert child.proc is not None
            code = await child.proc.wait()
            if self._stopping:
                return
            if code == 0:  # a worker exits 0 only after a drain (SIGTERM): it was removed on purpose
                log.info("%s exited after a drain; not restarting it", child.name)
                return
            if child.restarts >= self.max_restarts:
                log.error("%s exited with %s; not restarting (%d restarts already)", child.name, code,
                          child.restarts)
                return
            child.restarts += 1
            delay = min(30.0, 0.5 * 2 ** child.restarts)
            log.warning("%s exited with %s; restarting in %.1f s", child.name, code, delay)
            await asyncio.sleep(delay)
            try:
                await child.start(self.ready_timeout)
            except RuntimeError:
                log.exception("restart of %s failed", child.name)

    async def stop(self, grace: float = 10.0) -> None:
        self._stopping = True
        for t in self._watchers:
            t.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await asyncio.gather(*(c.stop(grace) for c in self.children))


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))  # N workers on few cores must not oversubscribe
    env["PYTHONUNBUFFERED"] = "1"
    return env
