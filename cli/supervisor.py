"""Child-process supervision for `kvrelay serve`: start workers, restart crashed ones, stop them all.
A child that exits 0 (a worker drained after SIGTERM, e.g. by an operator or the planner) is not
restarted; any other exit (a crash, SIGKILL) is.

Invariants: a child never outlives the supervisor (PR_SET_PDEATHSIG on Linux delivers SIGTERM to it
if the supervisor dies, even by SIGKILL); `stop()` sends SIGTERM, waits, then SIGKILLs stragglers, so
after it returns no child is running.

Children are spawned by CPython's subprocess (vfork + exec, no Python code between them), never by the
event loop's own spawn: uvloop forks and runs the interpreter's after-fork handlers in the child, and
in a process with gRPC threads (etcd discovery) such a child dies of SIGSEGV before exec (3 of 120
spawns here; a frontend whose extra HTTP process died so at start exited). The child sets its own
PR_SET_PDEATHSIG at start (`die_with_parent`, from `PARENT_ENV`), then checks its parent is still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
PARENT_ENV = "KVRELAY_DIE_WITH_PARENT"  # the supervisor's pid: the child dies (SIGTERM) with it


def die_with_parent() -> None:
    """In a child started by `Child` (cli/main.py calls it first): SIGTERM when the supervisor dies, and
    exit at once if it died before this ran."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent or not sys.platform.startswith("linux"):
        return
    _die_with_parent()
    if os.getppid() != int(parent):
        os._exit(1)


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG(SIGTERM) for the calling process: from `die_with_parent` at a child's start, and as
    the planner's local connector's preexec_fn (between its fork and exec)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = (),
                 new_session: bool = False):
        """`pass_fds`: file descriptors the child inherits (an HTTP child's listening socket).
        `new_session`: a terminal's Ctrl-C does not reach the child; only the supervisor signals it."""
        self.name, self.argv, self.env, self.pass_fds = name, argv, env, pass_fds
        self.new_session = new_session
        self.proc: _Process | None = None
        self.address: str | None = None
        self.restarts = 0

    async def start(self, ready_timeout: float) -> str:
        # vfork + exec: returns as soon as the child exec'd (blocking only that long, by design; see above)
        popen = subprocess.Popen(self.argv, env={**self.env, PARENT_ENV: str(os.getpid())},  # noqa: ASYNC220
                                 stdout=subprocess.PIPE, stderr=None, pass_fds=self.pass_fds,
                                 start_new_session=self.new_session)
        self.proc = await _Process.wrap(popen)
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


class _Process:
    """The asyncio.subprocess.Process surface `Child` uses, over a `subprocess.Popen`: stdout read through
    the loop, the exit awaited through a pidfd (no thread per child)."""

    def __init__(self, popen: subprocess.Popen, stdout: asyncio.StreamReader):
        self.popen, self.pid, self.stdout = popen, popen.pid, stdout
        self._exited: asyncio.Future | None = None

    @classmethod
    async def wrap(cls, popen: subprocess.Popen) -> _Process:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), popen.stdout)
        return cls(popen, reader)

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def kill(self) -> None:
        self.popen.kill()

    async def wait(self) -> int:
        if self.popen.poll() is not None:
            return self.popen.returncode
        if self._exited is None:
            self._exited = asyncio.ensure_future(self._wait_exit())
        return await asyncio.shield(self._exited)

    async def _wait_exit(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll
            while self.popen.poll() is None:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            return self.popen.returncode
        try:
            exited = loop.create_future()
            loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
            try:
                if self.popen.poll() is None:
                    await exited
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)
        return self.popen.wait()


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
