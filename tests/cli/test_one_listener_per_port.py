"""One listener per port (issue 30): a second server on a busy port is a one-line error naming the
port and exit 2, never a second listener sharing the port (SO_REUSEPORT)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

import pytest

from kvrelay.cli.http_workers import listen
from kvrelay.runtime.config import ConfigError


def kvrelay(*args: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "kvrelay.cli.main", *args], capture_output=True, text=True,
                         timeout=timeout)
    return out, time.monotonic() - t0


@contextlib.contextmanager
def busy_port(reuseport: bool):
    """A port with a listener on it; `reuseport`: the listener allows others to share it, as kvrelay's
    own socket did (then only the second server's socket decides whether they share)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuseport))
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.mark.parametrize("reuseport", [True, False])
def test_listen_refuses_a_busy_port_even_when_its_listener_would_share(reuseport):
    with busy_port(reuseport) as port, pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is already in use"):
        listen("127.0.0.1", port)


@pytest.mark.parametrize("command", [
    ["serve", "--model", "tiny", "--workers", "1", "--http-workers", "2"],
    ["serve", "--model", "tiny", "--workers", "1", "--http-workers", "1"],
    ["frontend", "--events", "inproc", "--http-workers", "1"],
])
def test_second_server_on_a_busy_port_exits_2_naming_the_port(command, tmp_path):
    with busy_port(True) as port:
        out, took = kvrelay(*command, "--http-port", str(port), "--discovery-dir", str(tmp_path))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and "Traceback" not in out.stderr, out.stderr
    assert took < 10, took  # before any heavy work (model, workers)
