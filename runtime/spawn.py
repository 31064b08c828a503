"""Starting child processes from an asyncio program: `spawn` and the `ChildProcess` it returns.

Children are spawned by CPython's subprocess (vfork + exec, no Python code between them), never by the
event loop's own spawn: uvloop forks and runs the interpreter's after-fork handlers in the child, and
in a process with gRPC threads (etcd discovery) such a child dies of SIGSEGV before exec (3 of 120
spawns here; a frontend whose extra HTTP process died so at start exited). So no `preexec_fn` either:
the child sets its own PR_SET_PDEATHSIG at start (`die_with_parent`, told by `PARENT_ENV`), then
checks that its parent is still there. Used by the fleet (runtime/fleet.py), the one owner of
`kvrelay serve`'s child processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1
PARENT_ENV = "KVRELAY_DIE_WITH_PARENT"  # the owner's pid: the child dies (SIGTERM) with it


def die_with_parent() -> None:
    """In a child started by `spawn` (cli/main.py calls it first): SIGTERM when its parent dies, and exit
    at once if the parent died before this ran."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent or not sys.platform.startswith("linux"):
        return
    _die_with_parent()
    if os.getppid() != int(parent):
        os._exit(1)


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG(SIGTERM) for the calling process."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


async def spawn(argv: list[str], env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = (),
                new_session: bool = False) -> ChildProcess:
    """Start `argv` with its stdout piped to us; it dies with this process (PARENT_ENV). vfork + exec:
    blocks only until the child exec'd, by design (see above)."""
    popen = subprocess.Popen(argv, env={**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())},  # noqa: ASYNC220
                             stdout=subprocess.PIPE, stderr=None, pass_fds=pass_fds, start_new_session=new_session)
    return await ChildProcess.wrap(popen)


class ChildProcess:
    """asyncio.subprocess.Process's surface (pid, stdout, returncode, send_signal, kill, wait) over a
    `subprocess.Popen`: stdout read through the loop, the exit awaited through a pidfd (no thread per
    child)."""

    def __init__(self, popen: subprocess.Popen, stdout: asyncio.StreamReader):
        self.popen, self.pid, self.stdout = popen, popen.pid, stdout
        self._exited: asyncio.Future | None = None

    @classmethod
    async def wrap(cls, popen: subprocess.Popen) -> ChildProcess:
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

            def on_exit() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(fd, on_exit)
            try:
                if self.popen.poll() is None:
                    await exited
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)
        return self.popen.wait()
