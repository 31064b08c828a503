"""vLLM's engine processes must not outlive the worker that started them.

vLLM spawns its EngineCore and model-runner processes and stops them from `AsyncLLM.shutdown()`; a
worker killed outright (SIGKILL, OOM killer) never runs that, and the orphans keep their gigabytes of
weights and KV cache (observed: 2.8 GB left behind per killed worker). So the worker first becomes
leader of its own process group (vLLM's processes inherit it), then starts a tiny watchdog in that group
whose parent-death signal (PR_SET_PDEATHSIG) fires when the worker dies, however it dies; the watchdog
then SIGKILLs the whole group, itself included.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import subprocess
import sys

log = logging.getLogger(__name__)

_WATCHDOG = r"""
import ctypes, os, signal, sys
pgid, parent = int(sys.argv[1]), int(sys.argv[2])
def reap(*_):
    os.killpg(pgid, signal.SIGKILL)
signal.signal(signal.SIGTERM, reap)
ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != parent:  # the worker died before the signal was armed
    reap()
sys.stdin.read()  # the worker holds the pipe open; EOF means it is gone
reap()
"""


def guard_process_group() -> subprocess.Popen | None:
    """Make this process a group leader and arm the watchdog (Linux only; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError):  # already a group or session leader: keep that group
        if os.getpgrp() != os.getpid():
            os.setpgid(0, 0)
    if os.getpgrp() != os.getpid():  # never arm it over a group that holds other processes
        log.warning("could not lead a process group: vLLM's processes may outlive a killed worker")
        return None
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpgrp()), str(os.getpid())],
                                stdin=subprocess.PIPE, close_fds=True)
    atexit.register(disarm, watchdog)  # any exit that skipped the engine's close()
    return watchdog


def disarm(watchdog: subprocess.Popen | None) -> None:
    """This process is exiting on its own: SIGKILL what is left of vLLM below it, then stop the watchdog
    without letting it reap (SIGKILL skips its handler; an EOF on its pipe at exit would reap us)."""
    if watchdog is None or watchdog.poll() is not None:
        return
    for pid in descendants(os.getpid()):
        if pid != watchdog.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    watchdog.kill()
    watchdog.wait()


def descendants(root: int) -> list[int]:
    """Every live process below `root` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
