"""A TCP port for another process to bind later, chosen outside the kernel's ephemeral range.

Binding port 0 and handing the number on is racy: until the other process binds it (vLLM binds its NIXL
side channel only after loading the model, seconds later), the kernel may give the same ephemeral port
to any outgoing connection on the machine. A port below the ephemeral range is never handed out that
way; only another chooser could take it, and a random pick makes that unlikely (CI saw the racy kind
fail: "Address already in use" on vLLM's side channel, the decode worker then never ready).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10000  # below this live well-known services (etcd 2379, nats 4222, prometheus 9090, ...)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for automatically assigned ports (Linux's default where it cannot be read)."""
    try:
        lo, hi = (int(x) for x in _RANGE_FILE.read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port free on `host` now and outside the ephemeral range; falls back to an ephemeral one (the old,
    racy kind) only when no such port is free in `tries` random picks."""
    lo, hi = ephemeral_range()
    below = range(_LOWEST, lo) if lo > _LOWEST else range(0)
    above = range(hi + 1, 65536)
    choices = [r for r in (below, above) if len(r)]
    for _ in range(tries if choices else 0):
        r = random.choice(choices)
        port = random.choice(r)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
