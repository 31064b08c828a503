"""Real etcd and nats-server processes for tests: free loopback ports, temp data dirs, clean stop.

A server can be stopped and started again on the same ports and data dir, which the outage tests use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from kvrelay.runtime.free_port import free_port  # noqa: F401 - the tests import it from here


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class ServerProcess:
    """One external server. `start()`/`stop()` may be called repeatedly; ports and data dir are kept."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path):
        self.name, self.argv, self.port, self.log_path = name, argv, port, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{self.name} did not start; log:\n{self.log_path.read_text()[-2000:]}") from None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def _require(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
    if path is None:
        raise RuntimeError(f"{binary} not installed: apt-get install -y etcd-server nats-server (see .ci/run)")
    return path


def etcd_server(workdir: Path) -> ServerProcess:
    client, peer = free_port(), free_port()
    argv = [
        _require("etcd"), "--name", "kvrelay-test", "--data-dir", str(workdir / "etcd-data"),
        "--listen-client-urls", f"http://127.0.0.1:{client}",
        "--advertise-client-urls", f"http://127.0.0.1:{client}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"kvrelay-test=http://127.0.0.1:{peer}",
        "--log-level", "warn",
    ]
    return ServerProcess("etcd", argv, client, workdir / "etcd.log")


def nats_server(workdir: Path) -> ServerProcess:
    port = free_port()
    argv = [_require("nats-server"), "-a", "127.0.0.1", "-p", str(port)]
    return ServerProcess("nats-server", argv, port, workdir / "nats.log")
