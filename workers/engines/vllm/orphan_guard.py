"""vLLM's engine processes must not outlive the worker that started them.

vLLM spawns its EngineCore and model-runner processes and stops them from `AsyncLLM.shutdown()`; a
worker killed outright (SIGKILL, OOM killer) never runs that, and the orphans keep their gigabytes of
weights and KV cache (observed: 2.8 GB left behind per killed worker). So the worker first becomes
leader of its own process group (vLLM's processes inherit it), then starts a tiny watchdog in that group
whose parent-death signal (PR_SET_PDEATHSIG) fires when the worker dies, however it dies; the watchdog
then SIGKILLs the whole group, itself included.
"""

from __future__ import annotations

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
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpgrp()), str(os.getpid())],
                            stdin=subprocess.PIPE, close_fds=True)


def disarm(watchdog: subprocess.Popen | None) -> None:
    """A clean shutdown: stop the watchdog without letting it reap (SIGKILL skips its handler)."""
    if watchdog is not None and watchdog.poll() is None:
        watchdog.kill()
        watchdog.wait()
