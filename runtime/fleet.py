"""The one owner of a machine's child processes: `kvrelay serve`'s workers (with or without the planner)
and its extra HTTP processes.

A `Fleet` holds slots, each a child it keeps running from a `ProcessPlan`; the caller asks for counts per
kind (`scale`), and reads how many serve (`ready`). A child is ready once it printed `READY <address>`;
`FAILED <reason>` is its own reason it could not start. Rules, one place for all of them:

- a child that exits 0 (it drained after SIGTERM: an operator, the planner) leaves its slot; any other
  exit (a crash, SIGKILL) is restarted with backoff, at most `max_restarts` times;
- a child whose *first* start fails is not retried (a bad flag does not fix itself): `start` raises, a
  later `scale` logs it and the slot goes (the planner sees one fewer ready and asks again);
- scale-down drains the newest children first (they hold the least work; a starting one is cheapest);
- `close` sends SIGTERM to every child, waits `grace`, then SIGKILLs stragglers: after it returns none
  is running; and a child never outlives this process (runtime/spawn.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kvrelay.runtime.spawn import ChildProcess, spawn

log = logging.getLogger("kvrelay.fleet")

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class ProcessPlan:
    """How to start one child: its command line and environment, nothing inferred from either later."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    pass_fds: tuple[int, ...] = ()  # file descriptors it inherits (an HTTP child's listening socket)
    new_session: bool = False  # a terminal's Ctrl-C does not reach it; only the owner signals it


class StartFailed(RuntimeError):
    """A child could not start (its FAILED reason, or no READY line within the timeout)."""


class _Slot(Generic[K]):
    """One child the fleet keeps running: started, watched, restarted after a crash, stopped."""

    def __init__(self, kind: K, plan: ProcessPlan):
        self.kind, self.plan = kind, plan
        self.proc: ChildProcess | None = None
        self.address: str | None = None
        self.stopping = False
        self.restarts = 0
        self.first_start: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        return self.address is not None and not self.stopping and self.proc is not None \
            and self.proc.returncode is None

    async def start_once(self, ready_timeout: float) -> str:
        self.address = None
        self.proc = await spawn(list(self.plan.argv), dict(self.plan.env), self.plan.pass_fds,
                                self.plan.new_session)
        try:
            line = await asyncio.wait_for(self._ready_line(), ready_timeout)
        except (asyncio.TimeoutError, EOFError):
            await self.stop()
            raise StartFailed(f"{self.plan.name} did not become ready within {ready_timeout:.0f} s") from None
        if line.startswith("FAILED "):
            await self.stop()
            raise StartFailed(f"{self.plan.name} failed to start: {line.split(' ', 1)[1]}")
        self.address = line.split(" ", 1)[1]
        return self.address

    async def _ready_line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            line = raw.decode(errors="replace").strip()
            if line.startswith(("READY ", "FAILED ")):
                return line
        raise EOFError

    async def drain_stdout(self) -> None:
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
            log.warning("%s did not stop within %.0f s; killing it", self.plan.name, grace)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


class Fleet(Generic[K]):
    """Child processes by kind. `plan(kind, ordinal)` says how to start the `ordinal`-th child the fleet
    starts (0, 1, ...; a restart keeps its plan)."""

    def __init__(self, plan: Callable[[K, int], ProcessPlan], ready_timeout: float = 120.0,
                 max_restarts: int = 5, stop_grace: float = 10.0):
        self.plan, self.ready_timeout = plan, ready_timeout
        self.max_restarts, self.stop_grace = max_restarts, stop_grace
        self.slots: list[_Slot[K]] = []
        self._stops: set[asyncio.Task[None]] = set()
        self._started = 0
        self._closing = False

    async def start(self, target: Mapping[K, int]) -> None:
        """Start `target` children per kind and wait until every one serves; raises `StartFailed` (with
        the first child's reason) if one cannot start."""
        new = self._grow(target)
        results = await asyncio.gather(*(s.first_start for s in new), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def scale(self, target: Mapping[K, int]) -> None:
        """Ask for `target` children per kind; returns at once (starts run, drains run in the background).
        A child that cannot start is logged, and its slot goes."""
        for slot in self._grow(target):
            slot.first_start.add_done_callback(_log_failure)
        for kind, n in target.items():
            live = self._live(kind)
            newest_first = sorted(live, key=lambda s: (s.address is not None, -self.slots.index(s)))
            for slot in newest_first[:max(0, len(live) - n)]:
                self._stop_slot(slot, self.stop_grace)

    def ready(self) -> dict[K, int]:
        """Children of each kind that serve now (started, not stopping, alive)."""
        counts: dict[K, int] = {}
        for s in self.slots:
            if s.serving:
                counts[s.kind] = counts.get(s.kind, 0) + 1
        return counts

    def live(self) -> list[ChildProcess]:
        """The processes running now (any state)."""
        return [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]

    async def close(self, grace: float | None = None) -> None:
        self._closing = True
        for s in self.slots:
            if not s.stopping:
                self._stop_slot(s, self.stop_grace if grace is None else grace)
        await asyncio.gather(*self._stops, return_exceptions=True)
        tasks = [s.task for s in self.slots if s.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _live(self, kind: K) -> list[_Slot[K]]:
        return [s for s in self.slots if s.kind == kind and not s.stopping and s.task is not None
                and not s.task.done()]

    def _grow(self, target: Mapping[K, int]) -> list[_Slot[K]]:
        if self._closing:
            raise RuntimeError("the fleet is closing")
        new = []
        for kind, n in target.items():
            for _ in range(n - len(self._live(kind))):
                slot = _Slot(kind, self.plan(kind, self._started))
                self._started += 1
                self.slots.append(slot)
                slot.task = asyncio.create_task(self._keep(slot))
                new.append(slot)
        return new

    def _stop_slot(self, slot: _Slot[K], grace: float) -> None:
        slot.stopping = True
        log.info("stopping %s (SIGTERM: drain)", slot.plan.name)
        task = asyncio.create_task(slot.stop(grace))
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)

    async def _keep(self, slot: _Slot[K]) -> None:
        """Start the slot's child, then restart it after each crash until it exits 0, is stopped, or has
        crashed `max_restarts` times; the slot then leaves the fleet."""
        try:
            await self._start(slot)
            while not slot.stopping:
                assert slot.proc is not None
                code = await slot.proc.wait()
                if slot.stopping:
                    return
                if code == 0:  # a child exits 0 only after a drain (SIGTERM): it was removed on purpose
                    log.info("%s exited after a drain; not restarting it", slot.plan.name)
                    return
                if slot.restarts >= self.max_restarts:
                    log.error("%s exited with %s; not restarting (%d restarts already)", slot.plan.name, code,
                              slot.restarts)
                    return
                slot.restarts += 1
                delay = min(30.0, 0.5 * 2 ** slot.restarts)
                log.warning("%s exited with %s; restarting in %.1f s", slot.plan.name, code, delay)
                await asyncio.sleep(delay)
                if slot.stopping:
                    return
                try:
                    await self._start(slot)
                except StartFailed as e:
                    log.error("restart of %s failed: %s", slot.plan.name, e)
        finally:
            if not slot.first_start.done():
                slot.first_start.set_exception(StartFailed(f"{slot.plan.name} was stopped before it started"))
            if not self._closing and slot in self.slots and (slot.proc is None or slot.proc.returncode is not None):
                self.slots.remove(slot)

    async def _start(self, slot: _Slot[K]) -> None:
        first = not slot.first_start.done()
        try:
            address = await slot.start_once(self.ready_timeout)
        except StartFailed as failed:
            if not first:
                raise
            # stopped while it started: not a failure of its own
            reason = StartFailed(f"{slot.plan.name} was stopped before it started") if slot.stopping else failed
            slot.stopping = True
            slot.first_start.set_exception(reason)
            return
        asyncio.get_running_loop().create_task(slot.drain_stdout())
        if first:
            slot.first_start.set_result(address)


def _log_failure(first_start: asyncio.Future[str]) -> None:
    e = first_start.exception()  # retrieved here, so never "never retrieved"
    if e is not None and "stopped before it started" not in str(e):
        log.error("%s", e)
