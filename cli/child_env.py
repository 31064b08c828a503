"""The environment of a child process `kvrelay` starts on this machine."""

from __future__ import annotations

import os


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))  # N processes on few cores must not oversubscribe
    env["PYTHONUNBUFFERED"] = "1"
    return env
